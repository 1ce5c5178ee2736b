"""Checkpoints: reading anyone's files without running code (``reader``), committing and choosing our own
(``manager``: commit marker with sizes and SHA-256, completeness, keep-last-k, corrupt fallback), and what a
trainer saves and restores (``training_state``, imported from there: it needs the engine)."""

from .manager import CheckpointManager
from .reader import CheckpointError, load_model_state, read_checkpoint, read_state_dict

__all__ = ["CheckpointError", "CheckpointManager", "load_model_state", "read_checkpoint", "read_state_dict"]
