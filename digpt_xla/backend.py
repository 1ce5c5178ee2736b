"""The one place that knows which hardware runs: cpu, cuda, xla (PJRT, one process per chip) and xla-spmd.

Model, engine and data code call this interface and never branch on the backend. torch_xla is imported
lazily, only by the XLA backends, so ``import digpt_xla`` works where torch_xla is not installed.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .daemon_pool import DaemonPool
from .precision import PRECISIONS, autocast_dtype, precision_problem

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


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules sharded one by one (the transformer blocks), as the module lists them in ``shard_units()``."""
    units = getattr(module, "shard_units", None)
    return list(units()) if callable(units) else []


class Backend:
    """Eager PyTorch on one device; with torchrun, DDP over a process group, or FSDP2 (``fully_shard`` per block)
    when ``fsdp`` > 1. Subclasses change the device."""

    name = "cpu"
    process_group_backend = "gloo"
    compiles_step = False  # True where the first step traces and compiles a graph (XLA): the loop says so

    def __init__(self, compile_cache: str = "", fsdp: int = 1) -> None:
        self.distributed = launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(self.process_group_backend)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = self._select_device()
        self.fsdp = fsdp
        self._check_fsdp(self.world_size, "processes (torchrun --nproc_per_node x nodes)")
        self._mesh = None
        self._control = dist.new_group(backend="gloo") if self.distributed else None

    def _check_fsdp(self, devices: int, what: str) -> None:
        if self.fsdp < 1 or devices % self.fsdp:
            raise BackendError(
                f"backend.fsdp={self.fsdp} must be a positive divisor of the {devices} {what}; the fsdp axis shards "
                "parameters and optimizer state, the remaining factor replicates them (data parallel)"
            )

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

    def prepare_model(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        """Move to the device (before the optimizer is built) and wrap for data parallelism: DDP, or FSDP2 with a
        ``MixedPrecisionPolicy`` for ``precision`` when ``fsdp`` > 1. State-dict keys keep their names."""
        model = model.to(self.device)
        if self.fsdp > 1:
            return self._fully_shard(model, precision)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def prepare_frozen(self, module: nn.Module, shard: bool = False, precision: str = "fp32") -> nn.Module:
        """A frozen module (the teacher): on the device, outside any data-parallel wrapper; its weights split like
        the student's when ``shard`` (and ``fsdp`` > 1)."""
        module = module.to(self.device)
        if shard and self.fsdp > 1 and any(True for _ in module.parameters()):
            return self._fully_shard(module, precision)
        return module

    def _fully_shard(self, module: nn.Module, precision: str) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self._mesh is None:
            # 2-D (data, fsdp) = HSDP: parameters sharded within an fsdp group, replicated across groups.
            shape, names = (self.world_size // self.fsdp, self.fsdp), ("data", "fsdp")
            self._mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
            if shape[0] == 1:
                self._mesh = self._mesh["fsdp"]
        dtype = autocast_dtype(precision) if precision in PRECISIONS else None
        # Compute in the training precision; gradients are reduced in fp32 as under DDP + autocast.
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        for unit in shard_units(module):
            fully_shard(unit, mesh=self._mesh, mp_policy=policy)
        return fully_shard(module, mesh=self._mesh, mp_policy=policy)

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

        if self.fsdp > 1:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            # On the CPU the gathered tensors can share storage with FSDP's buffers, which the next step reuses.
            return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}
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
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        from torch.distributed.tensor import DTensor, distribute_tensor

        if full:
            # Each rank cuts its own shard out of the whole tensor. torch's full_state_dict loading would do it too,
            # but leaves the second name of a shared parameter (the release's ar_enc_norm.1 is ar_enc_norm.0) whole.
            placed = get_model_state_dict(model)
            model_state = {
                k: distribute_tensor(
                    v.to(placed[k].device), placed[k].device_mesh, placed[k].placements, src_data_rank=None
                )
                if isinstance(placed.get(k), DTensor)
                else v
                for k, v in model_state.items()
            }
        set_model_state_dict(model, model_state)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=full))
        self.place_optimizer_state(optimizer)

    def write_sharded(self, state: dict[str, Any], url: str, asynchronous: bool) -> Future | None:
        """Every rank writes its shards of ``state`` to the DCP checkpoint at ``url``; in the background (returning
        a Future) when ``asynchronous``: the state is copied to host memory before this returns."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer, group = FsspecWriter(url), self._checkpoint_group()
        if asynchronous:
            return dcp.async_save(state, storage_writer=writer, process_group=group)
        dcp.save(state, storage_writer=writer, process_group=group)
        return None

    def _checkpoint_group(self) -> Any:
        """The process group DCP coordinates through: a gloo group of its own, so that a background write never
        interleaves its collectives with the training step's (FSDP2's all-gathers on the default group would
        then meet DCP's in a different order on each rank: a deadlock). Every rank creates it, in the same order."""
        if not self.distributed:
            return None
        if getattr(self, "_gloo_group", None) is None:
            self._gloo_group = dist.new_group(backend="gloo")
        return self._gloo_group

    def read_sharded(self, state: dict[str, Any], url: str) -> None:
        """Fill ``state`` (tensors placed as this run places them) in place from the DCP checkpoint at ``url``."""
        import torch.distributed.checkpoint as dcp

        from .checkpoint.reader import dcp_reader

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
        dtype = autocast_dtype(precision)
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
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            model.set_requires_gradient_sync(not skip)
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
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        run_step()
        torch.cuda.synchronize(self.device)
        return {"bytes": torch.cuda.max_memory_allocated(self.device), "source": "torch.cuda.max_memory_allocated"}

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

    def __init__(self, compile_cache: str = "", fsdp: int = 1) -> None:
        if fsdp != 1 and type(self) is XlaBackend:
            raise BackendError(
                f"backend.fsdp={fsdp} needs backend.name=xla-spmd; the multi-process xla backend is data parallel only"
            )
        self.fsdp = fsdp
        self.compile_cache = compile_cache or os.environ.get("DIGPT_XLA_CACHE", "")
        _check_xla_environment()
        # XLA's C++ warnings (GSPMD's deprecation notice, once per compiled graph on SPMD) would flood the log; set
        # TF_CPP_MIN_LOG_LEVEL=0 to see them. Errors still show.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
        self._control = self._host_group() if type(self) is XlaBackend else None

    def _host_group(self) -> Any:
        """A gloo group between this run's processes (PJRT's ``xla://`` rendezvous) for host-side agreement and
        DCP's coordination; None for one process."""
        if self.world_size == 1:
            return None
        if not dist.is_initialized():
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers init_method="xla://")

            dist.init_process_group("gloo", init_method="xla://")
        return dist.new_group(backend="gloo")

    def _setup_runtime(self) -> None:
        if self.compile_cache:
            self._xr.initialize_cache(
                os.path.join(self.compile_cache, f"rank{self._xr.global_ordinal()}"), readonly=False
            )

    def manual_seed(self, seed: int) -> None:
        super().manual_seed(seed)
        self._torch_xla.manual_seed(seed)

    def prepare_model(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
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
            "persistent_cache_hits": met.counter_value("PersistentCacheHit") or 0,
            "persistent_cache_misses": met.counter_value("PersistentCacheMiss") or 0,
            "persistent_cache_load_failures": met.counter_value("PersistentCacheDeserializeFailure") or 0,
            "device_to_host_transfers": transfers[0],
            "aten_fallbacks": {c: met.counter_value(c) for c in met.counter_names() if c.startswith("aten::")},
        }

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        return self._xm.all_reduce(self._xm.REDUCE_SUM, t) / self.world_size

    def step_memory(self, run_step: Callable[[], list[Tensor]]) -> dict[str, Any]:
        """Compile (never run) the step's graph and read XLA's buffer assignment of the per-device program; needs
        ``--xla_dump_to=DIR`` in XLA_FLAGS before the runtime starts (``tools/bench.py memory`` sets it)."""
        flag = next((f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_dump_to=")), None)
        if flag is None:
            raise BackendError("step memory on XLA needs XLA_FLAGS=--xla_dump_to=DIR set before torch_xla starts")
        dump = flag.split("=", 1)[1]
        before = set(glob.glob(os.path.join(dump, "*buffer-assignment.txt")))
        self._torch_xla._XLAC._xla_warm_up_cache(run_step(), [])
        reports = sorted(set(glob.glob(os.path.join(dump, "*buffer-assignment.txt"))) - before)
        if not reports:
            raise BackendError(f"XLA wrote no buffer-assignment dump under {dump}")
        step = max((_buffer_assignment(path) for path in reports), key=lambda r: r["inputs"] + r["temporaries"])
        return {
            # The step's outputs replace the parameters and moments they update in place (torch_xla donates those
            # input buffers when the step runs), so they add nothing beyond the inputs.
            "bytes": step["inputs"] + step["temporaries"],
            "inputs_bytes": step["inputs"],
            "temporaries_bytes": step["temporaries"],
            "source": "XLA buffer assignment of the compiled per-device step program (inputs + temporaries)",
        }

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


# Python warnings that torch_xla's and DCP's own code raises at every sharded save; nothing a user can act on.
_KNOWN_WARNINGS = (
    "Using a non-tuple sequence for multidimensional indexing",  # torch_xla's XLAShardedTensor
    "TypedStorage is deprecated",  # DCP's filesystem writer
    ".*torch.distributed is disabled, unavailable or uninitialized",  # DCP in one process
)
for _message in _KNOWN_WARNINGS:
    warnings.filterwarnings("ignore", message=_message)


def _check_xla_environment() -> None:
    """PJRT's own errors for these are a C++ abort or a hang; say what is wrong before torch_xla starts."""
    device = os.environ.get("PJRT_DEVICE", "")
    if device and device.upper() not in ("TPU", "CPU"):
        raise BackendError(
            f"PJRT_DEVICE={device}: torch_xla 2.9 runs on TPU (and CPU, for tests); GPUs run backend.name=cuda"
        )
    count = os.environ.get("CPU_NUM_DEVICES")
    if count is not None and (not count.strip().isdigit() or int(count) < 1):
        raise BackendError(f"CPU_NUM_DEVICES={count!r}: the number of XLA:CPU devices, a whole number >= 1")


def _buffer_assignment(path: str) -> dict[str, int]:
    """Bytes of the inputs (entry parameters), temporaries and outputs in one of XLA's buffer-assignment dumps,
    whose allocations read ``allocation 6: size 393216, parameter 64, shape |f32[512,192]| ...``."""
    kinds = {"parameter": "inputs", "preallocated-temp": "temporaries", "thread-local": "temporaries"}
    sizes = {"inputs": 0, "temporaries": 0, "outputs": 0}
    with open(path) as f:
        for line in f:
            match = re.match(r"allocation \d+: size (\d+), ([a-z-]+)", line)
            if match:
                sizes[kinds.get(match[2], "outputs")] += int(match[1])
    return sizes


class XlaSpmdBackend(XlaBackend):
    """torch_xla SPMD: one process per host over a ``(data, fsdp)`` mesh of all devices of the slice.

    The batch is sharded over both axes. With ``fsdp`` > 1 every parameter, and its AdamW moments, is split over the
    ``fsdp`` axis (FSDPv2: the compiler all-gathers a block's weights where it runs and reduce-scatters its
    gradients); with 1 they are declared replicated. The output of every module that owns weights is sharded on
    the batch. Each host feeds only its own slice of the batch,
    declared to torch_xla as a minibatch of the global array; one host is the same code with one slice.
    """

    name = "xla-spmd"

    def _setup_runtime(self) -> None:
        import torch_xla.distributed.spmd as xs

        self._xr.use_spmd()
        super()._setup_runtime()
        self._xs = xs

    def __init__(self, compile_cache: str = "", fsdp: int = 1) -> None:
        super().__init__(compile_cache, fsdp)
        self.rank = self._xr.process_index()
        self.world_size = self._xr.process_count()
        n = self._xr.global_runtime_device_count()
        self._check_fsdp(n, "devices of the slice")
        self.mesh = self._xs.Mesh(np.arange(n), (n // fsdp, fsdp), ("data", "fsdp"))
        self._xs.set_global_mesh(self.mesh)
        self._param_specs: dict[Tensor, tuple[str | None, ...]] = {}
        self._input_specs: dict[int, Any] = {}
        # Hosts agree (preemption) over a group of their own; DCP coordinates over the default group.
        self._control = self._host_group()
        self.distributed = self._control is not None

    @property
    def devices_per_process(self) -> int:
        return self._xr.addressable_runtime_device_count()

    def describe(self) -> str:
        data, fsdp = self.mesh.mesh_shape
        return f"{self.name} (mesh data={data} x fsdp={fsdp}, host {self.rank}/{self.world_size})"

    @staticmethod
    def _batch_spec(ndim: int) -> tuple:
        return (("data", "fsdp"),) + (None,) * (ndim - 1)

    def _parameter_spec(self, p: Tensor) -> tuple[str | None, ...] | None:
        """Split the largest dimension the fsdp size divides; None (replicated) when none does."""
        if self.fsdp == 1:
            # Declared replicated, not left unannotated: the first step's outputs come back annotated, and parameters
            # without it in step 1 but with it from step 2 on made step 2 compile a second graph.
            return (None,) * p.ndim
        dims = [d for d in sorted(range(p.ndim), key=lambda d: -p.shape[d]) if p.shape[d] % self.fsdp == 0]
        if not dims:
            return None
        return tuple("fsdp" if d == dims[0] else None for d in range(p.ndim))

    def _shard_parameters(self, module: nn.Module) -> None:
        for p in module.parameters():
            spec = self._parameter_spec(p)
            if spec is None:
                log.warning(
                    "backend.fsdp=%d divides no dimension of a %s parameter: replicated", self.fsdp, tuple(p.shape)
                )
                continue
            self._xs.mark_sharding(p, self.mesh, spec)
            self._param_specs[p] = spec
        # Every module that owns weights (and the module itself) returns batch-sharded activations. Left to itself
        # the partitioner follows a weight's fsdp split into its output and gathers the whole global batch instead
        # of the weight (tensor parallelism): per-device activations then grow with the device count.
        owners = {m for m in module.modules() if any(True for _ in m.parameters(recurse=False))}
        for m in owners | set(shard_units(module)) | {module}:
            m.register_forward_hook(self._shard_output_on_batch)

    def _shard_output_on_batch(self, module: nn.Module, inputs: Any, output: Any) -> None:
        # nn.MultiheadAttention returns (activations, weights); structured outputs (the model's own) are left alone.
        first = output[0] if isinstance(output, tuple) and output else output
        if isinstance(first, Tensor) and first.ndim > 0:
            self._xs.mark_sharding(first, self.mesh, self._batch_spec(first.ndim))

    def prepare_model(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        model = model.to(self.device)  # unsharded tensors are copied to every device
        self._shard_parameters(model)
        return model

    def prepare_frozen(self, module: nn.Module, shard: bool = False, precision: str = "fp32") -> nn.Module:
        module = module.to(self.device)
        if shard and self.fsdp > 1:
            self._shard_parameters(module)
        elif self.fsdp > 1:
            # Its targets meet the sharded student's predictions in the loss: keep them split on the batch too.
            module.register_forward_hook(self._shard_output_on_batch)
        return module

    def place_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        for p, state in optimizer.state.items():
            spec = self._param_specs.get(p)
            for value in state.values() if spec is not None else ():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    self._xs.mark_sharding(value, self.mesh, spec)

    def shard_shapes(self, t: Tensor) -> list[tuple[int, ...]]:
        if self._torch_xla._XLAC._get_xla_sharding_spec(t) in ("", "{replicated}"):
            return [tuple(t.shape)] * self.devices_per_process
        return [tuple(shard.data.shape) for shard in self._xs.wrap_if_sharded(t).local_shards]

    def prepare_loader(self, loader: Iterable) -> Iterable:
        return _MappedIterable(loader, self.move)

    def move(self, batch: Any) -> Any:
        """This host's slice of the batch (its rows, in data-rank order) becomes its part of the global array."""

        def to_device(t: Tensor) -> Tensor:
            if t.ndim == 0:
                return t.to(self.device)
            if t.ndim not in self._input_specs:
                self._input_specs[t.ndim] = self._xs.ShardingSpec(self.mesh, self._batch_spec(t.ndim), minibatch=True)
            return self._xm.send_cpu_data_to_device(t, self.device, self._input_specs[t.ndim])[0]

        return tree_map_tensors(to_device, batch)

    def replicate(self, tree: Any) -> Any:
        return tree_map_tensors(lambda t: t.to(self.device), tree)

    def model_state_cpu(self, model: nn.Module) -> dict[str, Tensor]:
        return self.to_cpu(model.state_dict())  # sharded XLA tensors come back whole

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        pass  # implied by the sharded batch

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        return t  # values computed under SPMD are already global

    def write_sharded(self, state: dict[str, Any], url: str, asynchronous: bool) -> Future | None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        save = functools.partial(dcp.save, storage_writer=FsspecWriter(url), planner=_spmd_save_planner())
        if not asynchronous:
            save(state)
            return None
        # This host's shards copied to host memory now, as torch_xla's own CheckpointManager.save_async stages them.
        from torch_xla.experimental.distributed_checkpoint._helpers import _sharded_cpu_state_dict

        if not hasattr(self, "_writer"):
            self._writer = DaemonPool(1, "digpt-dcp")  # one write at a time, in order; never blocks exit
        return self._writer.submit(save, _sharded_cpu_state_dict(state))

    def read_sharded(self, state: dict[str, Any], url: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

        from .checkpoint.reader import dcp_reader

        dcp.load(state, storage_reader=dcp_reader(url), planner=SPMDLoadPlanner())

    def shutdown(self) -> None:
        Backend.shutdown(self)  # the gloo group of a multi-host run (XlaBackend has none to close)


def _spmd_save_planner():
    """torch_xla's SPMD save planner, writing each distinct shard of this host once.

    Its own planner de-duplicates replicas only across hosts, keyed by (name, offset) per host's plan: a host that
    holds two replicas of one shard (the data axis of a (data, fsdp) mesh on one host) listed the key twice in one
    plan, and the de-duplication then dropped both, so the checkpoint held no sharded tensor at all."""
    import dataclasses

    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    class OneReplicaSpmdSavePlanner(SPMDSavePlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            seen, items = set(), []
            for item in plan.items:
                key = (item.index.fqn, item.index.offset)
                if key not in seen:
                    seen.add(key)
                    items.append(item)
            return dataclasses.replace(plan, items=items)

    return OneReplicaSpmdSavePlanner()


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


def create_backend(name: str = "auto", compile_cache: str = "", fsdp: int = 1) -> Backend:
    """``compile_cache``: a directory for XLA's persistent compilation cache (or $DIGPT_XLA_CACHE); eager
    backends ignore it. ``fsdp``: the size of the mesh axis that parameters and optimizer state are split over."""
    return BACKENDS[resolve_backend_name(name)](compile_cache, fsdp)


def xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True
