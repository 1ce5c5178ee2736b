"""The one place that knows which hardware runs: cpu, cuda, xla (PJRT, one process per chip) and xla-spmd.

Model, engine and data code call this interface and never branch on the backend. torch_xla is imported
lazily, only by the XLA backends, so ``import digpt_xla`` works where torch_xla is not installed.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .precision import PRECISIONS, precision_problem

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
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
    """Eager PyTorch on one device; with torchrun, DDP over a process group. Subclasses change the device."""

    name = "cpu"
    process_group_backend = "gloo"
    compiles_step = False  # True where the first step traces and compiles a graph (XLA): the loop says so

    def __init__(self, compile_cache: str = "") -> None:
        self.distributed = launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(self.process_group_backend)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = self._select_device()

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

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device (before the optimizer is built) and wrap for data parallelism."""
        model = model.to(self.device)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def prepare_frozen(self, module: nn.Module) -> nn.Module:
        """A frozen module (the teacher): on the device, outside any data-parallel wrapper."""
        return module.to(self.device)

    def compile_module(self, module: nn.Module) -> nn.Module:
        """``torch.compile`` the module's forward in place (``nn.Module.compile``), so state-dict keys keep their
        names; call before ``prepare_model`` wraps it for data parallelism."""
        module.compile()
        return module

    def move(self, batch: Any) -> Any:
        return tree_map_tensors(lambda t: t.to(self.device, non_blocking=True), batch)

    def prepare_loader(self, loader: Iterable) -> Iterable:
        """An iterable of device batches."""
        return _MappedIterable(loader, self.move)

    def check_precision(self, precision: str, role: str = "training") -> None:
        """Refuse a precision this backend cannot run as ``role`` ("training" or "teacher"), naming the ones it can."""
        problem = precision_problem(self.name, precision, role)
        if problem:
            raise BackendError(problem)

    def check_attention(self, mode: str) -> None:
        """Refuse an attention mode (``model.attention``) this backend cannot run."""

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """The numeric context of a forward pass; callers check the precision for their role first."""
        if precision not in PRECISIONS:
            raise BackendError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision == "tpu-emulation":
            from .tpu_emulation import tpu_matmul_emulation

            return tpu_matmul_emulation()
        dtype = PRECISIONS[precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self, precision: str) -> torch.amp.GradScaler | None:
        self.check_precision(precision)
        return None

    def optimizer_options(self) -> dict[str, Any]:
        """Extra keyword arguments for torch optimizers on this backend."""
        return {}

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

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_host(self, fn: Callable[..., None], *tensors: Tensor) -> None:
        """Call ``fn`` with ``tensors`` readable on the host (deferred until after the step on XLA)."""
        fn(*tensors)

    # ------------------------------------------------------------------ state
    def to_cpu(self, tree: Any) -> Any:
        return tree_map_tensors(lambda t: t.detach().cpu(), tree)

    def rng_state(self) -> dict[str, Any]:
        """Every random generator a step may draw from, as tensors and tuples (loadable with weights_only=True)."""
        name, keys, pos, has_gauss, cached = np.random.get_state()
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

    def grad_scaler(self, precision: str) -> torch.amp.GradScaler | None:
        self.check_precision(precision)
        return torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def optimizer_options(self) -> dict[str, Any]:
        return {"fused": True}  # one kernel launch for the whole AdamW update

    def _device_rng_state(self) -> Any:
        return torch.cuda.get_rng_state(self.device)

    def _set_device_rng_state(self, state: Any) -> None:
        torch.cuda.set_rng_state(state, self.device)


class XlaBackend(Backend):
    """torch_xla PJRT: one process per device (``torch_xla.launch``), gradients all-reduced at the step."""

    name = "xla"
    compiles_step = True

    def __init__(self, compile_cache: str = "") -> None:
        self.compile_cache = compile_cache or os.environ.get("DIGPT_XLA_CACHE", "")
        try:
            import torch_xla
            import torch_xla.core.xla_model as xm
            import torch_xla.runtime as xr
        except ImportError as e:
            raise BackendError(f"backend {self.name!r} needs torch_xla, which cannot be imported: {e}") from e
        self._torch_xla, self._xm, self._xr = torch_xla, xm, xr
        self._setup_runtime()
        self.distributed = False  # collectives go through xm, not a torch.distributed group
        self.rank = xr.global_ordinal()
        self.world_size = xr.world_size()
        self.local_rank = xr.local_ordinal()
        self.device = torch_xla.device()

    def _setup_runtime(self) -> None:
        if self.compile_cache:
            self._xr.initialize_cache(
                os.path.join(self.compile_cache, f"rank{self._xr.global_ordinal()}"), readonly=False
            )

    def manual_seed(self, seed: int) -> None:
        super().manual_seed(seed)
        self._torch_xla.manual_seed(seed)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.world_size > 1:
            self._xm.broadcast_master_param(model)
        return model

    def check_attention(self, mode: str) -> None:
        if mode == "flex":
            raise BackendError(
                f"model.attention='flex' runs on the cpu and cuda backends; {self.name} keeps 'sdpa' (XLA compiles the "
                "masked attention of the step itself)"
            )

    def compile_module(self, module: nn.Module) -> nn.Module:
        raise BackendError(
            f"backend.compile=true is for the eager backends (cuda, cpu); {self.name} already compiles the whole "
            "step into one XLA graph"
        )

    def prepare_loader(self, loader: Iterable) -> Iterable:
        import torch_xla.distributed.parallel_loader as pl

        return pl.MpDeviceLoader(loader, self.device)

    def move(self, batch: Any) -> Any:
        return tree_map_tensors(lambda t: t.to(self.device), batch)

    def optimizer_options(self) -> dict[str, Any]:
        # Capturable AdamW keeps its step count and bias corrections on the device. Otherwise they are Python
        # scalars that change every step, and torch_xla (which dedups scalar inputs by value) traces a new graph
        # whenever two of them happen to coincide or stop coinciding: several compilations instead of one.
        return {"capturable": True}

    def learning_rate(self, value: float) -> float | Tensor:
        # A fresh device tensor each step: the lr is an input of the step's graph, never a baked-in constant.
        # Capturable Adam divides by the step size, so the warmup's lr of exactly 0 would give 0/0; 1e-30 is the
        # same as 0 for fp32 weights (1 - 1e-30 * wd rounds to 1, updates of ~1e-30 vanish) and is finite.
        return torch.tensor(max(value, 1e-30), dtype=torch.float32).to(self.device)

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self.world_size > 1:
            self._xm.reduce_gradients(optimizer)

    def mark_step(self) -> None:
        self._torch_xla.sync()

    def synchronize(self) -> None:
        self._torch_xla.sync()
        self._xm.wait_device_ops()

    def debug_counters(self) -> dict[str, Any]:
        import torch_xla.debug.metrics as met

        compile_time = met.metric_data("CompileTime") or (0, 0.0)
        transfers = met.metric_data("TransferFromDeviceTime") or (0, 0.0)
        return {
            "compilations": compile_time[0],
            "compile_time_s": compile_time[1] / 1e9,
            "device_to_host_transfers": transfers[0],
            "aten_fallbacks": {c: met.counter_value(c) for c in met.counter_names() if c.startswith("aten::")},
        }

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        return self._xm.all_reduce(self._xm.REDUCE_SUM, t) / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            self._xm.rendezvous("digpt_barrier")

    def on_host(self, fn: Callable[..., None], *tensors: Tensor) -> None:
        # Runs after the graph of this step has executed: reading the values then costs no extra sync.
        self._xm.add_step_closure(lambda *ts: fn(*(t.cpu() for t in ts)), args=tensors)

    def to_cpu(self, tree: Any) -> Any:
        self.mark_step()
        return tree_map_tensors(lambda t: t.detach().cpu(), tree)

    def _device_rng_state(self) -> Any:
        return self._xm.get_rng_state()

    def _set_device_rng_state(self, state: Any) -> None:
        self._xm.set_rng_state(int(state))

    def shutdown(self) -> None:
        pass


class XlaSpmdBackend(XlaBackend):
    """torch_xla SPMD: one process per host, a 1-D ``data`` mesh over all devices, batch sharded, model
    replicated. The compiler inserts the gradient all-reduce."""

    name = "xla-spmd"

    def _setup_runtime(self) -> None:
        import torch_xla.distributed.spmd as xs

        self._xr.use_spmd()
        super()._setup_runtime()
        n = self._xr.global_runtime_device_count()
        self._xs = xs
        self.mesh = xs.Mesh(np.arange(n), (n,), ("data",))

    def __init__(self, compile_cache: str = "") -> None:
        super().__init__(compile_cache)
        self.rank = self._xr.process_index()
        self.world_size = self._xr.process_count()

    @property
    def devices_per_process(self) -> int:
        return self._xr.addressable_runtime_device_count()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)  # replicated: unsharded tensors are copied to every device

    def prepare_loader(self, loader: Iterable) -> Iterable:
        return _MappedIterable(loader, self.move)

    def move(self, batch: Any) -> Any:
        def shard(t: Tensor) -> Tensor:
            t = t.to(self.device)
            self._xs.mark_sharding(t, self.mesh, ("data",) + (None,) * (t.ndim - 1))
            return t

        return tree_map_tensors(shard, batch)

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        pass  # implied by the sharded batch

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        return t  # values computed under SPMD are already global

    def barrier(self) -> None:
        if self.world_size > 1:
            self._xm.rendezvous("digpt_barrier")


class _MappedIterable:
    """``map(fn, loader)`` that can be iterated more than once and keeps ``len``."""

    def __init__(self, loader: Iterable, fn: Callable[[Any], Any]) -> None:
        self.loader, self.fn = loader, fn

    def __iter__(self) -> Iterator[Any]:
        return (self.fn(b) for b in self.loader)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


BACKENDS: dict[str, type[Backend]] = {
    "cpu": Backend,
    "cuda": CudaBackend,
    "xla": XlaBackend,
    "xla-spmd": XlaSpmdBackend,
}


def resolve_backend_name(name: str) -> str:
    """``auto``: xla on a TPU host (PJRT_DEVICE=TPU or /dev/accel*), else cuda if present, else cpu."""
    if name != "auto":
        if name not in BACKENDS:
            raise BackendError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
        return name
    if os.environ.get("PJRT_DEVICE", "").upper() == "TPU" or glob.glob("/dev/accel*"):
        return "xla"
    return "cuda" if torch.cuda.is_available() else "cpu"


def create_backend(name: str = "auto", compile_cache: str = "") -> Backend:
    """``compile_cache``: a directory for XLA's persistent compilation cache (or $DIGPT_XLA_CACHE); eager
    backends ignore it."""
    return BACKENDS[resolve_backend_name(name)](compile_cache)


def xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True
