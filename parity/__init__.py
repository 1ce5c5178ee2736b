"""Backend parity harness: the same D-iGPT work on two sides (backend x numeric setting), compared."""

from .harness import ParityConfig, load_parity_config, run_parity
from .sides import Side

__all__ = ["ParityConfig", "Side", "load_parity_config", "run_parity"]
