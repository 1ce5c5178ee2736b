"""Training loops, the shared optimizer step and resume path, schedules, checkpoints, metrics and signals."""

from .checkpoint import CheckpointManager
from .pretrain import Pretrainer, TrainResult
from .trainer import NonFiniteLossError, Trainer

__all__ = ["CheckpointManager", "NonFiniteLossError", "Pretrainer", "TrainResult", "Trainer"]
