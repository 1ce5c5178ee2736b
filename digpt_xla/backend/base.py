"""The backend interface and the eager backends: cpu (gloo under torchrun) and cuda (NCCL).

Model, engine and data code call this interface and never branch on the backend. The XLA backends (``xla.py``)
subclass it; torch_xla is imported only there, so ``import digpt_xla`` works where torch_xla is not installed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import UserError
from ..models.layers import BlockRunner, run_in_order, torch_checkpoint
from ..precision import ADAMW_KERNELS, PRECISIONS, autocast_dtype, precision_problem, store_for_autocast
from .mesh import SCANNING_BACKENDS, blocks_problem, layout_problem
from .sharding import fsdp2_mesh, fully_shard_blocks, load_named_state

log = logging.getLogger(__name__)

# Python warnings that torch_xla's and DCP's own code raise at every sharded save; nothing a user can act on.
_KNOWN_WARNINGS = (
    "Using a non-tuple sequence for multidimensional indexing",  # torch_xla's XLAShardedTensor
    "TypedStorage is deprecated",  # DCP's filesystem writer
    ".*torch.distributed is disabled, unavailable or uninitialized",  # DCP in one process
)
for _message in _KNOWN_WARNINGS:
    warnings.filterwarnings("ignore", message=_message)


class BackendError(UserError, RuntimeError):
    """A backend that cannot run here, or a setting it does not support."""


def tree_map_tensors(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in nested dicts, lists and tuples."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map_tensors(fn, v) for v in tree)
    return tree


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


class Backend:
    """Eager PyTorch on one device; with torchrun, DDP over a process group, or FSDP2 (``fully_shard`` per block)
    when ``fsdp`` > 1. Subclasses change the device."""

    name = "cpu"
    process_group_backend = "gloo"
    compiles_step = False  # True where the first step traces and compiles a graph (XLA): the loop says so

    def __init__(self, compile_cache: str = "", fsdp: int = 1) -> None:
        self.fsdp = fsdp
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
        self._check_fsdp(self.world_size, "processes (torchrun --nproc_per_node x nodes)")
        self._control = dist.new_group(backend="gloo") if self.distributed else None

    def _check_fsdp(self, devices: int, what: str) -> None:
        problem = layout_problem(self.name, self.fsdp, devices=devices, what=what)
        if problem:
            raise BackendError(problem)

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

    @property
    def shards_state(self) -> bool:
        """True when parameters and optimizer state are split across devices: checkpoints are then sharded (DCP)."""
        return self.fsdp > 1

    def configure_blocks(self, scan: str, remat: str, precision: str = "fp32") -> None:
        """How stacks of blocks run (``backend.scan``, ``backend.remat``; ``precision``, the training one), for the
        modules prepared from now on."""
        problem = blocks_problem(self.name, scan)
        if problem:
            raise BackendError(problem)
        self.scan_blocks = scan != "never" and self.name in SCANNING_BACKENDS
        # torch_xla 2.9's scan traces its backward with AOTAutograd; under bf16 autocast that graph multiplies a
        # bf16 by an f32 operand (the attention softmax's gradient), which XLA's verifier rejects: trainable blocks
        # are scanned in fp32 training only, frozen ones (forward only) always.
        self.scan_trains = self.scan_blocks and precision == "fp32"
        self.remat = remat

    def block_runner(self, trainable: bool) -> BlockRunner:
        """What runs a module's stack of blocks (its ``block_runner``): one by one, rematerialised when asked (a
        frozen module keeps nothing for a backward pass, so it never is)."""
        remat = trainable and self.remat == "blocks"
        return functools.partial(run_in_order, checkpoint=torch_checkpoint if remat else None)

    def _set_block_runner(self, module: nn.Module, trainable: bool) -> None:
        if hasattr(module, "block_runner"):
            setattr(module, "block_runner", self.block_runner(trainable))  # noqa: B010 (not an nn.Module field)

    def prepare_model(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        """Move to the device (before the optimizer is built) and wrap for data parallelism: DDP, or FSDP2 with a
        ``MixedPrecisionPolicy`` for ``precision`` when ``fsdp`` > 1. State-dict keys keep their names."""
        self._set_block_runner(model, trainable=True)
        model = model.to(self.device)
        if self.shards_state:
            return self._fully_shard(model, precision)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def prepare_frozen(self, module: nn.Module, shard: bool = False, precision: str = "fp32") -> nn.Module:
        """A frozen module (the teacher): on the device, outside any data-parallel wrapper; its weights split like
        the student's when ``shard`` (and ``fsdp`` > 1)."""
        self._set_block_runner(module, trainable=False)
        module = module.to(self.device)
        if shard and self.shards_state and any(True for _ in module.parameters()):
            return self._fully_shard(module, precision)  # FSDP2 casts what it gathers to ``precision`` itself
        store_for_autocast(module, precision)
        return module

    def device_memory_bytes(self) -> int | None:
        """Memory of one device, for placement choices (``teacher.placement=auto``); None when unknown (the host's
        memory is shared with everything else)."""
        return None

    def _fully_shard(self, module: nn.Module, precision: str) -> nn.Module:
        if self._mesh is None:
            self._mesh = fsdp2_mesh(self.device.type, self.world_size, self.fsdp)
        return fully_shard_blocks(module, self._mesh, precision)

    def place_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the optimizer's state the placement of its parameters (after it is created or loaded)."""

    def shard_shapes(self, t: Tensor) -> list[tuple[int, ...]]:
        """The shape of the part of ``t`` that each of this process's devices holds."""
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return [tuple(t.to_local().shape)]
        return [tuple(t.shape)]

    def model_state_cpu(self, model: nn.Module) -> dict[str, Tensor]:
        """The whole state dict of ``model`` as CPU tensors, gathered from its shards (every rank calls this)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.shards_state:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            # On the CPU the gathered tensors can share storage with FSDP's buffers, which the next step reuses.
            gathered = cast(dict[str, Tensor], get_model_state_dict(model, options=options))
            return {k: v.clone() for k, v in gathered.items()}
        return self.to_cpu(self.unwrap(model).state_dict())

    def nonfinite_parameters(self, named: list[tuple[str, Tensor]]) -> list[str]:
        """Names of the parameters holding a NaN or inf on any device (one host read; for checkpoint time)."""
        from torch.distributed.tensor import DTensor

        flags = torch.stack([(~torch.isfinite(p.to_local() if isinstance(p, DTensor) else p)).any() for _, p in named])
        flags = flags.float()
        if self.distributed and self.shards_state:
            dist.all_reduce(flags)
        return [n for (n, _), bad in zip(named, self.to_cpu(flags).tolist(), strict=True) if bad]

    def full_value(self, t: Tensor) -> Tensor:
        """A value computed from sharded tensors (a DTensor under FSDP2), as one ordinary tensor."""
        from torch.distributed.tensor import DTensor

        return t.full_tensor() if isinstance(t, DTensor) else t

    # ------------------------------------------------------------------ sharded checkpoints (DCP)
    def training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model, optimizer) state dicts keyed by parameter names, each tensor as it is placed (a local shard under
        FSDP2, a sharded XLA tensor under SPMD): what DCP writes and reads in place, resharding on load."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(model, optimizer)

    def load_training_state(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict,
        optimizer_state: dict,
        full: bool = False,
    ) -> None:
        """Load name-keyed states: as placed (``training_state``'s form), or whole tensors when ``full``."""
        load_named_state(model, optimizer, model_state, optimizer_state, full)
        self.place_optimizer_state(optimizer)

    def write_sharded(self, state: dict[str, Any], url: str, asynchronous: bool) -> Future | None:
        """Every rank writes its shards of ``state`` to the DCP checkpoint at ``url``; in the background (returning
        a Future) when ``asynchronous``: the state is copied to host memory before this returns."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer, group = FsspecWriter(url), self._checkpoint_group()
        if asynchronous:
            return cast(Future, dcp.async_save(state, storage_writer=writer, process_group=group))
        dcp.save(state, storage_writer=writer, process_group=group)
        return None

    def _checkpoint_group(self) -> Any:
        """The process group DCP coordinates through: a gloo group of its own, so that a background write never
        interleaves its collectives with the training step's (FSDP2's all-gathers on the default group would
        then meet DCP's in a different order on each rank: a deadlock). Every rank creates it, in the same order."""
        if not self.distributed:
            return None
        if self._gloo_group is None:
            self._gloo_group = dist.new_group(backend="gloo")
        return self._gloo_group

    def read_sharded(self, state: dict[str, Any], url: str) -> None:
        """Fill ``state`` (tensors placed as this run places them) in place from the DCP checkpoint at ``url``."""
        import torch.distributed.checkpoint as dcp

        from ..checkpoint.reader import dcp_reader

        dcp.load(state, storage_reader=dcp_reader(url), process_group=self._checkpoint_group())

    def compile_module(self, module: nn.Module) -> nn.Module:
        """``torch.compile`` the module's forward in place (``nn.Module.compile``), so state-dict keys keep their
        names; call before ``prepare_model`` wraps it for data parallelism."""
        module.compile()
        return module

    def move(self, batch: Any) -> Any:
        """This process's part of a batch (dimension 0 = samples) onto the device."""
        return tree_map_tensors(lambda t: t.to(self.device, non_blocking=True), batch)

    def replicate(self, tree: Any) -> Any:
        """Tensors that every device holds whole (a mask, a scalar), not split as a batch."""
        return self.move(tree)

    def prepare_loader(self, loader: Iterable) -> Iterable:
        """An iterable of device batches."""
        return MappedIterable(loader, self.move)

    def check_precision(self, precision: str, role: str = "training") -> None:
        """Refuse a precision this backend cannot run as ``role`` ("training" or "teacher"), naming the ones it can."""
        problem = precision_problem(self.name, precision, role)
        if problem:
            raise BackendError(problem)

    def set_tf32(self, enabled: bool) -> None:
        """TF32 tensor-core math for fp32 matmuls and convolutions (``backend.tf32``): an NVIDIA mode."""
        if enabled:
            raise BackendError(f"backend.tf32=true is an NVIDIA tensor-core mode; the {self.name} backend has none")

    def check_attention(self, mode: str) -> None:
        """Refuse an attention mode (``model.attention``) this backend cannot run."""

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """The numeric context of a forward pass; callers check the precision for their role first."""
        if precision not in PRECISIONS:
            raise BackendError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision == "tpu-emulation":
            from ..tpu_emulation import tpu_matmul_emulation

            return tpu_matmul_emulation()
        dtype = autocast_dtype(precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

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

    def matmul_precision(self, level: str) -> contextlib.AbstractContextManager:
        """torch_xla's matmul precision (``default``, ``high``, ``highest``) for a block; only XLA has it."""
        raise BackendError(f"matmul precision {level!r} is a torch_xla setting; the {self.name} backend has none")

    def grad_scaler(self, precision: str) -> torch.amp.GradScaler | None:
        self.check_precision(precision)
        return None

    # torch AdamW's kernels a run may ask for (``optim.implementation``); "auto" is the backend's own choice.
    optimizer_implementations: tuple[str, ...] = ("auto", *ADAMW_KERNELS)

    def optimizer_options(self, implementation: str = "auto") -> dict[str, Any]:
        """Keyword arguments of torch's AdamW here: the backend's own (``auto``), or the kernel asked for."""
        options = self._optimizer_defaults()
        if implementation == "auto":
            return options
        if implementation not in self.optimizer_implementations:
            raise BackendError(
                f"optim.implementation={implementation!r} cannot run on {self.name}; choose one of "
                f"{', '.join(self.optimizer_implementations)}"
            )
        kept = {k: v for k, v in options.items() if k not in ("foreach", "fused")}
        return kept | ADAMW_KERNELS[implementation]

    def _optimizer_defaults(self) -> dict[str, Any]:
        return {}  # torch's own choice: the for-loop kernel for CPU tensors

    def learning_rate(self, value: float) -> float | Tensor:
        """The learning rate in the form this backend's optimizer takes it."""
        return value

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    # ------------------------------------------------------------------ step
    def no_sync(self, model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce of a micro-batch that is not the last of an accumulation."""
        if skip and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            cast(Any, model).set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """All-reduce gradients where the wrapper does not already (DDP does it during backward)."""

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

    # ------------------------------------------------------------------ state
    def to_cpu(self, tree: Any) -> Any:
        return tree_map_tensors(lambda t: t.detach().cpu(), tree)

    def rng_state(self) -> dict[str, Any]:
        """Every random generator a step may draw from, as tensors and tuples (loadable with weights_only=True)."""
        name, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state())
        return {
            "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "device": self._device_rng_state(),
        }

    def set_rng_state(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state.get("device") is not None:
            self._set_device_rng_state(state["device"])

    def _device_rng_state(self) -> Any:
        return None

    def _set_device_rng_state(self, state: Any) -> None:
        pass

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
