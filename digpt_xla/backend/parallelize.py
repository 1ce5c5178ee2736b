"""A backend's parallelism: wrapping the student for data parallelism or FSDP, placing the frozen teacher, and
how stacks of blocks run (in order, rematerialised)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, cast

import torch
from torch import nn

from ..models.layers import BlockRunner, run_in_order, torch_checkpoint
from ..precision import BACKENDS, store_for_autocast
from .errors import BackendError
from .mesh import ParallelDims, blocks_problem
from .sharding import fsdp2_mesh, fully_shard_blocks


class Parallelize:
    """The parallel part of a ``Backend``."""

    name: str
    device: torch.device
    dims: ParallelDims
    distributed: bool
    world_size: int
    scan_blocks: bool
    scan_trains: bool
    remat: str
    _mesh: Any
    shards_state: bool

    def configure_blocks(self, scan: str, remat: str) -> None:
        """How stacks of blocks run (``backend.scan``, ``backend.remat``), for the modules prepared from now on."""
        problem = blocks_problem(self.name, scan)
        if problem:
            raise BackendError(problem)
        self.scan_blocks = scan != "never" and BACKENDS[self.name].scans
        # A scanned loop keeps what each block saves for the backward pass in stacked buffers that XLA can neither
        # fuse away nor recompute: without remat that is more HBM than the unrolled step (ViT-H/14 at 16 per v5e
        # chip: 16.58 GiB against 10.36), with remat only each block's input. So "auto" scans a trained stack when
        # it is rematerialised; frozen ones (forward only) always.
        self.scan_trains = self.scan_blocks and (scan == "always" or remat == "blocks")
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

    def _fully_shard(self, module: nn.Module, precision: str) -> nn.Module:
        if self._mesh is None:
            self._mesh = fsdp2_mesh(self.device.type, self.dims)
        return fully_shard_blocks(module, self._mesh, precision)

    def compile_module(self, module: nn.Module) -> nn.Module:
        """``torch.compile`` the module's forward in place (``nn.Module.compile``), so state-dict keys keep their
        names; call before ``prepare_model`` wraps it for data parallelism."""
        module.compile()
        return module

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def no_sync(self, model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce of a micro-batch that is not the last of an accumulation."""
        if skip and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            cast(Any, model).set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """All-reduce gradients where the wrapper does not already (DDP does it during backward)."""
