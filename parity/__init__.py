"""Backend parity harness: the same D-iGPT work on two sides (backend x numeric setting), compared."""

import importlib
from typing import Any

_EXPORTS = {"ParityConfig": "config", "load_parity_config": "config", "run_parity": "harness", "Side": "sides"}


def __getattr__(name: str) -> Any:
    # Imported on first use: `python -m parity --help` need not wait for torch and timm.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ParityConfig", "Side", "load_parity_config", "run_parity"]
