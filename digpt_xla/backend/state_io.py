"""A backend's training state I/O: whole or sharded state dicts to and from the host, DCP reads and writes,
random-generator states."""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .mesh import ParallelDims
from .sharding import load_named_state


def tree_map_tensors(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in nested dicts, lists and tuples."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map_tensors(fn, v) for v in tree)
    return tree


class StateIO:
    """The state part of a ``Backend``."""

    dims: ParallelDims
    distributed: bool
    _gloo_group: Any
    unwrap: Callable[[nn.Module], nn.Module]

    @property
    def shards_state(self) -> bool:
        """True when parameters and optimizer state are split across devices: checkpoints are then sharded (DCP)."""
        return self.dims.sharded

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
