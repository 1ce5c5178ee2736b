"""The one place that knows which hardware runs: cpu, cuda, xla (PJRT, one process per chip) and xla-spmd.

``base``: the interface and the eager backends (cpu, cuda; DDP or FSDP2). ``sharding``: FSDP2's mesh and
``fully_shard`` per block. ``xla/``: PJRT and SPMD (FSDPv2), the only torch_xla code. ``mesh``: the parallel layout
(degrees and their checks, once). ``measure``: step memory.
"""

from __future__ import annotations

import glob
import importlib
import os
from typing import TYPE_CHECKING, Any

from ..precision import BACKENDS, unknown_backend

if TYPE_CHECKING:
    from .base import Backend

# Nothing is imported until it is used: the config checks import ``mesh`` from here without torch, and torch_xla is
# imported only when an XLA backend is created (where each class lives is the capability table's ``module``).
_EXPORTS = {
    "Backend": "base",
    "BackendError": "errors",
    "CudaBackend": "base",
    "launched_by_torchrun": "base",
    "shard_units": "sharding",
    "tree_map_tensors": "state_io",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend_class(name: str) -> type[Backend]:
    caps = BACKENDS[name]
    return getattr(importlib.import_module(f".{caps.module}", __name__), caps.cls)


def resolve_backend_name(name: str) -> str:
    """``auto``: xla on a TPU host (PJRT_DEVICE=TPU or /dev/accel*), else cuda if present, else cpu."""
    if name != "auto":
        if name not in BACKENDS:
            from .errors import BackendError

            raise BackendError(unknown_backend(name))
        return name
    if os.environ.get("PJRT_DEVICE", "").upper() == "TPU" or glob.glob("/dev/accel*"):
        return "xla"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def create_backend(name: str = "auto", compile_cache: str = "", fsdp: int = 1) -> Backend:
    """``compile_cache``: a directory for XLA's persistent compilation cache (or $DIGPT_XLA_CACHE); eager
    backends ignore it. ``fsdp``: the size of the mesh axis that parameters and optimizer state are split over."""
    return backend_class(resolve_backend_name(name))(compile_cache, fsdp)


def xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = [
    "Backend",
    "backend_class",
    "BackendError",
    "CudaBackend",
    "create_backend",
    "launched_by_torchrun",
    "resolve_backend_name",
    "shard_units",
    "tree_map_tensors",
    "xla_available",
]
