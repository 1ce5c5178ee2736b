"""Training loops, the shared optimizer step and resume path, schedules, metrics and signals."""

from .pretrain import Pretrainer, TrainResult
from .trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "Pretrainer", "TrainResult", "Trainer"]
