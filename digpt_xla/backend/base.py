"""The backend interface and the eager backends: cpu (gloo under torchrun) and cuda (NCCL).

Model, engine and data code call this interface and never branch on the backend. The XLA backends (``xla/``)
subclass it; torch_xla is imported only there, so ``import digpt_xla`` works where torch_xla is not installed.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .errors import BackendError
from .mesh import ParallelDims
from .numerics import Numerics
from .parallelize import Parallelize
from .state_io import StateIO, tree_map_tensors

log = logging.getLogger(__name__)

# Python warnings that torch_xla's and DCP's own code raise at every sharded save; nothing a user can act on.
_KNOWN_WARNINGS = (
    "Using a non-tuple sequence for multidimensional indexing",  # torch_xla's XLAShardedTensor
    "TypedStorage is deprecated",  # DCP's filesystem writer
    ".*torch.distributed is disabled, unavailable or uninitialized",  # DCP in one process
)
for _message in _KNOWN_WARNINGS:
    warnings.filterwarnings("ignore", message=_message)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


class Backend(Parallelize, Numerics, StateIO):
    """Eager PyTorch on one device; with torchrun, DDP over a process group, or FSDP2 (``fully_shard`` per block)
    when ``fsdp`` > 1. Subclasses change the device.

    By concern: this class is the runtime (processes, device, identity, device I/O, collectives); ``Parallelize``
    wraps and places modules, ``Numerics`` holds the precision, attention and optimizer rules, ``StateIO`` moves
    training state to and from the host and checkpoints."""

    name = "cpu"
    process_group_backend = "gloo"
    compiles_step = False  # True where the first step traces and compiles a graph (XLA): the loop says so

    def __init__(self, compile_cache: str = "", fsdp: int = 1) -> None:
        self.dims = ParallelDims(self.name, fsdp)  # the device count is added once the runtime has started
        self.compile_cache = compile_cache
        self.scan_blocks, self.scan_trains, self.remat = False, False, "none"  # set by configure_blocks
        self._mesh: Any = None  # FSDP2's DeviceMesh, built at the first fully_shard
        self._gloo_group: Any = None  # DCP's coordination group, made at the first sharded checkpoint
        self._start_runtime()

    def _start_runtime(self) -> None:
        """Join this run's processes: set ``distributed``, ``rank``, ``world_size``, ``local_rank``, ``device``, and
        ``_control`` (the host-side gloo group of ``any_rank``/``from_main``, None for one process)."""
        self.distributed = launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(self.process_group_backend)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = self._select_device()
        self._set_dims(self.world_size, "processes (torchrun --nproc_per_node x nodes)")
        self._control = dist.new_group(backend="gloo") if self.distributed else None

    def _set_dims(self, devices: int, what: str) -> None:
        try:
            self.dims = self.dims.on(devices, what)
        except ValueError as e:
            raise BackendError(str(e)) from None

    @property
    def fsdp(self) -> int:
        return self.dims.fsdp

    def _select_device(self) -> torch.device:
        return torch.device("cpu")

    # ------------------------------------------------------------------ identity
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Index of this process's share of the data."""
        return self.rank

    @property
    def data_world_size(self) -> int:
        return self.world_size

    @property
    def devices_per_process(self) -> int:
        """Devices one process feeds: the per-process batch is ``per-device batch x`` this."""
        return 1

    @property
    def global_devices(self) -> int:
        return self.data_world_size * self.devices_per_process

    def describe(self) -> str:
        return f"{self.name} ({self.device}, rank {self.rank}/{self.world_size})"

    # ------------------------------------------------------------------ setup
    def manual_seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def device_memory_bytes(self) -> int | None:
        """Memory of one device, for placement choices (``teacher.placement=auto``); None when unknown (the host's
        memory is shared with everything else)."""
        return None

    # ------------------------------------------------------------------ device I/O
    def move(self, batch: Any) -> Any:
        """This process's part of a batch (dimension 0 = samples) onto the device."""
        return tree_map_tensors(lambda t: t.to(self.device, non_blocking=True), batch)

    def replicate(self, tree: Any) -> Any:
        """Tensors that every device holds whole (a mask, a scalar), not split as a batch."""
        return self.move(tree)

    def prepare_loader(self, loader: Iterable) -> Iterable:
        """An iterable of device batches."""
        return MappedIterable(loader, self.move)

    def data_identities(self, tensors: list[Tensor]) -> list[int]:
        """What identifies each tensor's present device data in a traced program (read before tracing a step, for
        ``export_program``); only XLA traces programs."""
        raise BackendError(f"the {self.name} backend runs eagerly: it traces no program; use xla-spmd")

    def export_program(self, outputs: list[Tensor], identities: list[int]) -> tuple[bytes, list[tuple[int, int]]]:
        """The pending program computing ``outputs`` as a serialized HloModuleProto, traced but neither compiled
        nor run, and its donated buffers: (parameter number, output number) for each program input holding the
        value output i had before the step (``identities[i]``, from ``data_identities``): the buffer XLA may
        write that output into, as torch_xla donates it. Only XLA traces programs."""
        raise BackendError(f"the {self.name} backend runs eagerly: it has no program to export; use xla-spmd")

    # ------------------------------------------------------------------ step and collectives
    def mark_step(self) -> None:
        """End of a step: cut and run the lazy graph on XLA; nothing to do in eager mode."""

    def synchronize(self) -> None:
        """Wait until queued device work has finished (for timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def debug_counters(self) -> dict[str, Any]:
        """Compiler counters (compilations, CPU fallbacks, device-to-host transfers); empty for eager backends."""
        return {}

    def step_memory(self, run_step: Callable[[], list[Tensor]]) -> dict[str, Any]:
        """Per-device memory of one training step (``run_step`` runs it and returns the tensors it updates): on CUDA
        the peak of ``max_memory_allocated``; on XLA the compiled program's buffer assignment, without running it."""
        if self.device.type != "cuda":
            raise BackendError(f"{self.name}: step memory is measured on cuda and on the XLA backends")
        from .measure import cuda_step_memory

        return cuda_step_memory(self.device, run_step)

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def from_main(self, value: str | None) -> str | None:
        """The main rank's ``value`` on every rank (a decision such as which checkpoint to resume from), over the
        host-side control group."""
        if self._control is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (a preemption notice that reached some ranks only). A
        host-side all-reduce over a gloo group of its own: no device sync, never interleaved with the step's or a
        background checkpoint's collectives. Every rank calls it at the same step boundary."""
        if self._control is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return bool(t.item())  # a CPU tensor: no device sync

    def on_host(self, fn: Callable[..., None], *tensors: Tensor) -> None:
        """Call ``fn`` with ``tensors`` readable on the host (deferred until after the step on XLA)."""
        fn(*tensors)

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class CudaBackend(Backend):
    name = "cuda"
    process_group_backend = "nccl"

    def _select_device(self) -> torch.device:
        if not torch.cuda.is_available():
            raise BackendError("backend 'cuda' requested but torch.cuda.is_available() is False")
        torch.cuda.set_device(self.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; parity depends on it
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda", self.local_rank)

    def device_memory_bytes(self) -> int | None:
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def set_tf32(self, enabled: bool) -> None:
        # Process-wide switches, set by every run: one process (the parity harness) may run with and without.
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled

    def grad_scaler(self, precision: str) -> torch.amp.GradScaler | None:
        self.check_precision(precision)
        return torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def _optimizer_defaults(self) -> dict[str, Any]:
        return {"fused": True}  # one kernel launch for the whole AdamW update

    def _device_rng_state(self) -> Any:
        return torch.cuda.get_rng_state(self.device)

    def _set_device_rng_state(self, state: Any) -> None:
        torch.cuda.set_rng_state(state, self.device)


class MappedIterable:
    """``map(fn, loader)`` that can be iterated more than once and keeps ``len``."""

    def __init__(self, loader: Iterable, fn: Callable[[Any], Any]) -> None:
        self.loader, self.fn = loader, fn

    def __iter__(self) -> Iterator[Any]:
        return (self.fn(b) for b in self.loader)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]
