"""The XLA backends (torch_xla 2.9): ``xla`` (PJRT, one process per chip; ``pjrt``) and ``xla-spmd`` (one process
per host over a (data, fsdp) device mesh, FSDPv2; ``spmd``), and how they run stacks of blocks (``blocks``). This
package is the only code of the project that imports torch_xla: a backend on another runtime replaces it whole."""

from .pjrt import XlaBackend, launch
from .spmd import XlaSpmdBackend

__all__ = ["XlaBackend", "XlaSpmdBackend", "launch"]
