"""The XLA backends (torch_xla 2.9): ``xla`` (PJRT, one process per chip) and ``xla-spmd`` (one process per host
over a (data, fsdp) device mesh, FSDPv2). The only files of the package that import torch_xla: this one and what
it calls lazily."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..daemon_pool import DaemonPool
from ..models.layers import BlockRunner, run_in_order, tap_segments
from ..precision import store_for_autocast
from .base import Backend, MappedIterable
from .errors import BackendError
from .measure import compiled_step_memory
from .mesh import layout_problem, mesh_shape
from .sharding import shard_units
from .state_io import tree_map_tensors

log = logging.getLogger(__name__)


class XlaBackend(Backend):
    """torch_xla PJRT: one process per device (``torch_xla.launch``), gradients all-reduced at the step."""

    name = "xla"
    compiles_step = True

    def _start_runtime(self) -> None:
        problem = layout_problem(self.name, self.fsdp)
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
            return functools.partial(self._scan_blocks, remat=remat)
        if remat:
            return self._run_rematerialised
        return super().block_runner(trainable)

    @staticmethod
    def _run_rematerialised(
        blocks: Sequence[nn.Module], x: Tensor, extra: tuple = (), taps: Sequence[int] = ()
    ) -> list[Tensor]:
        """``run_in_order`` with each block under torch_xla's checkpoint: its optimization barrier keeps XLA from
        folding the recomputation back into the forward pass (torch's own checkpoint would be undone by CSE)."""
        from torch_xla.utils.checkpoint import checkpoint

        def rematerialised(block: nn.Module, *args: Tensor) -> Tensor:
            return cast(Tensor, checkpoint(block, *args, use_reentrant=True, preserve_rng_state=False))

        # Its backward puts the barrier on the block's inputs in place: handed the model's mask buffer itself, it
        # made the buffer an output of step 1 and step 2 compiled a second graph. The blocks get a copy.
        extra = tuple(e.clone() if isinstance(e, Tensor) else e for e in extra)
        return run_in_order(blocks, x, extra, taps, checkpoint=rematerialised)

    @staticmethod
    def _scan_blocks(
        blocks: Sequence[nn.Module], x: Tensor, extra: tuple = (), taps: Sequence[int] = (), remat: bool = False
    ) -> list[Tensor]:
        """``run_in_order`` as XLA loops: the blocks between two taps become one ``while`` over their stacked
        weights (torch_xla's ``scan``), so one block is traced and compiled however deep the stack is. The weights
        are stacked inside the step, as torch_xla's ``scan_layers`` does: parameters and state-dict keys stay the
        blocks' own. ``remat``: AOTAutograd's min-cut partition keeps the loop's inputs and recomputes the rest."""
        from functorch.compile import default_partition, min_cut_rematerialization_partition
        from torch.func import functional_call
        from torch_xla.experimental.scan import scan

        partition = min_cut_rematerialization_partition if remat else default_partition
        outputs = []
        for start, stop in tap_segments(len(blocks), taps):
            run = list(blocks[start:stop])
            if len(run) == 1:
                x = run[0](x, *extra)
            else:
                template = run[0]  # traced once with each iteration's weights swapped in
                names = [n for n, _ in template.named_parameters()]
                weights = [dict(b.named_parameters()) for b in run]
                stacked = {n: torch.stack([w[n] for w in weights]) for n in names}

                def one_block(carry: tuple, layer_weights: dict, template: nn.Module = template) -> tuple:
                    h, *rest = carry
                    return (functional_call(template, layer_weights, (h, *rest), strict=False), *rest), None

                (x, *_), _ = scan(one_block, (x, *extra), stacked, partition_fn=partition)
            outputs.append(x)
        return outputs

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
        import torch_xla.experimental.scan as xla_scan

        # torch_xla 2.9's scan ties the sharding of each gradient of its loop to its input's with jax's shard_alike,
        # and jax never shares a process with torch_xla here (each brings its own XLA). Without it the partitioner
        # propagates the backward loop's shardings itself, from the annotations inside the block (its outputs
        # split on the batch) and the parameters' own; the scanned step equals the unrolled one (tests).
        xla_scan.shard_as = _propagated_sharding
        self._xr.use_spmd()
        super()._setup_runtime()
        self._xs = xs

    def _join_processes(self) -> None:
        """One process per host over every device of the slice, arranged as the (data, fsdp) mesh."""
        self.rank, self.world_size = self._xr.process_index(), self._xr.process_count()
        n = self._xr.global_runtime_device_count()
        self._check_fsdp(n, "devices of the slice")
        if n > 1 and os.environ.get("PJRT_DEVICE", "").upper() == "CPU":
            log.warning(
                "xla-spmd on %d XLA:CPU devices (CPU_NUM_DEVICES): each takes data.batch_size images, so the global "
                "batch and the learning rate scale with the device count, as they would on %d chips",
                n,
                n,
            )
        self.mesh = self._xs.Mesh(np.arange(n), mesh_shape(n, self.fsdp), ("data", "fsdp"))
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
        """Split the first dimension when the fsdp size divides it, else the largest it divides; None (replicated)
        when none does. The first: libtpu fuses a gradient's all-reduce and slice into a reduce-scatter only for a
        split of the major dimension (a [64, 256] weight split on its 256 columns was all-reduced whole)."""
        if self.fsdp == 1:
            # Declared replicated, not left unannotated: the first step's outputs come back annotated, and parameters
            # without it in step 1 but with it from step 2 on made step 2 compile a second graph.
            return (None,) * p.ndim
        dims = [d for d in sorted(range(p.ndim), key=lambda d: (d > 0, -p.shape[d])) if p.shape[d] % self.fsdp == 0]
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
        self._keep_batch_sharded(module)

    def _keep_batch_sharded(self, module: nn.Module) -> None:
        """Every module that owns weights (and the module itself) returns batch-sharded activations. Left to itself
        the partitioner follows a weight's fsdp split into its output and gathers the whole global batch instead of
        the weight (tensor parallelism): per-device activations then grow with the device count. A replicated
        module needs it as much: unconstrained, ViT-H/14's attention gathered its activations of the global batch
        in every block."""
        owners = {m for m in module.modules() if any(True for _ in m.parameters(recurse=False))}
        for m in owners | set(shard_units(module)) | {module}:
            m.register_forward_hook(self._shard_output_on_batch)

    def _shard_output_on_batch(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        # The gradient is declared batch-sharded too: left to itself the partitioner scatters the gradient of a
        # gather (the visible tokens) into a zero tensor of the whole global batch, all-reduces it, and gathers the
        # whole batch of images for the patch embedding's weight gradient.
        # nn.MultiheadAttention returns (activations, weights); structured outputs (the model's own) are left alone.
        first = output[0] if isinstance(output, tuple) and output else output
        if not (isinstance(first, Tensor) and first.ndim > 0):
            return None
        sharded = self._xs.mark_sharding_with_gradients(first, self.mesh, self._batch_spec(first.ndim))
        return (sharded, *output[1:]) if isinstance(output, tuple) else sharded

    def prepare_model(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        self._set_block_runner(model, trainable=True)
        model = model.to(self.device)  # unsharded tensors are copied to every device
        self._shard_parameters(model)
        return model

    def prepare_frozen(self, module: nn.Module, shard: bool = False, precision: str = "fp32") -> nn.Module:
        store_for_autocast(module, precision)  # split or whole, the teacher is stored in the dtype it computes in
        self._set_block_runner(module, trainable=False)
        module = module.to(self.device)
        if shard and self.shards_state:
            self._shard_parameters(module)
        elif self.global_devices > 1:
            self._keep_batch_sharded(module)  # its targets meet the student's predictions split on the batch
        return module

    def place_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        for p, state in optimizer.state.items():
            spec = self._param_specs.get(p)
            for value in state.values() if spec is not None else ():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    self._xs.mark_sharding(value, self.mesh, cast(Any, spec))

    def shard_shapes(self, t: Tensor) -> list[tuple[int, ...]]:
        if self._torch_xla._XLAC._get_xla_sharding_spec(t) in ("", "{replicated}"):
            return [tuple(t.shape)] * self.devices_per_process
        return [tuple(shard.data.shape) for shard in self._xs.wrap_if_sharded(t).local_shards]

    def prepare_loader(self, loader: Iterable) -> Iterable:
        return MappedIterable(loader, self.move)

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

        if self._writer is None:
            self._writer = DaemonPool(1, "digpt-dcp")  # one write at a time, in order; never blocks exit
        return self._writer.submit(save, _sharded_cpu_state_dict(state))

    def read_sharded(self, state: dict[str, Any], url: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

        from ..checkpoint.reader import dcp_reader

        dcp.load(state, storage_reader=dcp_reader(url), planner=SPMDLoadPlanner())

    def shutdown(self) -> None:
        Backend.shutdown(self)  # the gloo group of a multi-host run (XlaBackend has none to close)


def _propagated_sharding(a: Any, b: Any) -> tuple[Any, Any]:
    return a, b


def _spmd_save_planner():
    """torch_xla's SPMD save planner, writing each distinct shard of this host once.

    Its own planner de-duplicates replicas only across hosts, keyed by (name, offset) per host's plan: a host that
    holds two replicas of one shard (the data axis of a (data, fsdp) mesh on one host) listed the key twice in one
    plan, and the de-duplication then dropped both, so the checkpoint held no sharded tensor at all."""
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
