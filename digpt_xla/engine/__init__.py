"""Training loops, the shared optimizer step, schedules, metrics and signals. (The one resume path is
``digpt_xla.checkpoint.training_state``.)"""

from .pretrain import Pretrainer, TrainResult
from .trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "Pretrainer", "TrainResult", "Trainer"]
