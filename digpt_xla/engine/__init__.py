"""Training loops, schedules, checkpoints, metrics and signals."""

from .checkpoint import CheckpointManager, load_checkpoint
from .pretrain import NonFiniteLossError, Pretrainer, TrainResult

__all__ = ["CheckpointManager", "NonFiniteLossError", "Pretrainer", "TrainResult", "load_checkpoint"]
