"""The ``xla-spmd`` backend: torch_xla SPMD over a (data, fsdp) mesh of the slice's devices, FSDPv2."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from ...daemon_pool import DaemonPool
from ...precision import store_for_autocast
from ..base import Backend, MappedIterable
from ..sharding import shard_units
from ..state_io import tree_map_tensors
from .pjrt import XlaBackend

log = logging.getLogger(__name__)


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
        self._set_dims(n, "devices of the slice")
        if n > 1 and os.environ.get("PJRT_DEVICE", "").upper() == "CPU":
            log.warning(
                "xla-spmd on %d XLA:CPU devices (CPU_NUM_DEVICES): each takes data.batch_size images, so the global "
                "batch and the learning rate scale with the device count, as they would on %d chips",
                n,
                n,
            )
        self.mesh = self._xs.Mesh(np.arange(n), self.dims.mesh_shape, ("data", "fsdp"))
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
        """The split ``ParallelDims.split_dim`` chooses; None (replicated, with a warning) when none divides."""
        if not self.dims.sharded:
            # Declared replicated, not left unannotated: the first step's outputs come back annotated, and parameters
            # without it in step 1 but with it from step 2 on made step 2 compile a second graph.
            return (None,) * p.ndim
        split = self.dims.split_dim(tuple(p.shape))
        return None if split is None else tuple("fsdp" if d == split else None for d in range(p.ndim))

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
        self._prestack_frozen_blocks(module)
        return module

    def _adopt_stack(self, stack: Tensor, members: list[Tensor]) -> None:
        specs = [self._param_specs.pop(p, None) for p in members]  # held here, their buffers would stay alive
        if specs[0] is not None:  # split like its members, one more dimension in front; else replicated
            self._xs.mark_sharding(stack, self.mesh, (None, *specs[0]))

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

        from ...checkpoint.reader import dcp_reader

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
