"""The ``xla`` backend: torch_xla 2.9's PJRT runtime, one process per chip (``torch_xla.launch``)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...daemon_pool import DaemonPool
from ...models.layers import BlockRunner
from ..base import Backend
from ..errors import BackendError
from ..measure import compiled_step_memory
from ..state_io import tree_map_tensors
from .blocks import PrestackedScan, run_rematerialised, scan_blocks

log = logging.getLogger(__name__)


class XlaBackend(Backend):
    """torch_xla PJRT: one process per device (``torch_xla.launch``), gradients all-reduced at the step."""

    name = "xla"
    compiles_step = True

    def _start_runtime(self) -> None:
        problem = self.dims.problem()
        if problem:
            raise BackendError(problem)
        self.compile_cache = self.compile_cache or os.environ.get("DIGPT_XLA_CACHE", "")
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
        self._writer: DaemonPool | None = None  # background checkpoint writes, one at a time
        try:
            self._setup_runtime()
            self.local_rank = xr.local_ordinal()
            self.device = torch_xla.device()
        except OSError as e:  # torch_xla's "libtpu not found" and kin, raised from deep in its runtime start
            device = os.environ.get("PJRT_DEVICE", "(unset)")
            raise BackendError(
                f"PJRT_DEVICE={device}: torch_xla's runtime did not start ({e}); on a TPU VM install torch_xla[tpu], "
                "elsewhere set PJRT_DEVICE=CPU"
            ) from None
        self._join_processes()

    def _join_processes(self) -> None:
        """One process per device: ranks are PJRT ordinals; collectives go through xm, not a torch.distributed
        group, which exists only for host-side agreement."""
        self.rank, self.world_size = self._xr.global_ordinal(), self._xr.world_size()
        self._set_dims(self.world_size, "processes (one per chip)")
        self.distributed = False
        self._control = self._host_group()

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

    def block_runner(self, trainable: bool) -> BlockRunner:
        remat = trainable and self.remat == "blocks"
        if self.scan_trains if trainable else self.scan_blocks:
            return functools.partial(scan_blocks, remat=remat)
        if remat:
            return run_rematerialised
        return super().block_runner(trainable)

    def prepare_frozen(self, module: nn.Module, shard: bool = False, precision: str = "fp32") -> nn.Module:
        module = super().prepare_frozen(module, shard, precision)
        self._prestack_frozen_blocks(module)
        return module

    def _prestack_frozen_blocks(self, module: nn.Module) -> None:
        """A frozen module's scanned blocks (its ``runner_blocks()``) stacked on the device once, now, instead of
        in every step (``PrestackedScan``)."""
        runner_blocks = getattr(module, "runner_blocks", None)
        blocks = list(runner_blocks()) if self.scan_blocks and runner_blocks is not None else []
        if len(blocks) < 2:
            return
        # Computed at once: left pending, the stacks would be outputs of the first step's program.
        runner = PrestackedScan(module, blocks, self._adopt_stack, self.mark_step)
        setattr(module, "block_runner", runner)  # noqa: B010 (not an nn.Module field)

    def _adopt_stack(self, stack: Tensor, members: list[Tensor]) -> None:
        pass  # one device per process: nothing to lay out, nothing held of the members

    def manual_seed(self, seed: int) -> None:
        super().manual_seed(seed)
        self._torch_xla.manual_seed(seed)

    def prepare_model(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        self._set_block_runner(model, trainable=True)
        model = model.to(self.device)
        if self.world_size > 1:
            self._xm.broadcast_master_param(model)
        return model

    def device_memory_bytes(self) -> int | None:
        if os.environ.get("PJRT_DEVICE", "").upper() == "CPU":
            return None  # XLA:CPU devices share the host's memory
        try:
            return int(self._xm.get_memory_info(self.device)["bytes_limit"])
        except (RuntimeError, KeyError, TypeError):
            return None

    def data_identities(self, tensors: list[Tensor]) -> list[int]:
        return [self._torch_xla._XLAC._xla_get_tensor_id(t) for t in tensors]

    def export_program(self, outputs: list[Tensor], identities: list[int]) -> tuple[bytes, list[tuple[int, int]]]:
        # The HLO torch_xla would compile at the next mark_step, with the SPMD shardings of its inputs. torch_xla
        # donates by tensor identity: a program input whose device data is the value an output tensor held before
        # the step (its id then, as in-place updates give the tensor a new id) lends its buffer to that output. The
        # device-data walk visits the graph in the HLO lowering's post order, so its n-th entry is parameter n.
        xlac = self._torch_xla._XLAC
        proto = xlac._get_xla_tensors_hlo_proto(outputs)
        owners, _ = xlac._get_tensors_xla_device_data_node(outputs)
        output_of = {identity: i for i, identity in enumerate(identities)}
        donors = [(param, output_of[owner]) for param, owner in enumerate(owners) if owner in output_of]
        return proto, donors

    @contextlib.contextmanager
    def matmul_precision(self, level: str) -> Iterator[None]:
        import torch_xla.backends

        previous = torch_xla.backends.get_mat_mul_precision()
        torch_xla.backends.set_mat_mul_precision(level)
        try:
            yield
        finally:
            torch_xla.backends.set_mat_mul_precision(previous)

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

    optimizer_implementations = ("auto", "for-loop", "foreach")  # torch's fused AdamW has no XLA kernel

    def _optimizer_defaults(self) -> dict[str, Any]:
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
        return cast(Tensor, self._xm.all_reduce(self._xm.REDUCE_SUM, t)) / self.world_size

    def step_memory(self, run_step: Callable[[], list[Tensor]]) -> dict[str, Any]:
        """Compile (never run) the step's graph and read XLA's buffer assignment of the per-device program; needs
        ``--xla_dump_to=DIR`` in XLA_FLAGS before the runtime starts (``tools/bench.py memory`` sets it)."""
        return compiled_step_memory(lambda: self._torch_xla._XLAC._xla_warm_up_cache(run_step(), []))

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


def launch(fn: Callable[..., None], args: tuple, single_process: bool) -> None:
    """Run ``fn(index, *args)`` in one process per local device (PJRT), or in this process when ``single_process``."""
    import torch_xla

    torch_xla.launch(fn, args=args, debug_single_process=single_process)


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
