"""FSDP2 on the eager backends: the device mesh, ``fully_shard`` per block, and loading name-keyed states into
sharded modules. (XLA's FSDPv2 is applied in ``xla/spmd.py``; only ``xla/`` may import torch_xla.)"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ..precision import PRECISIONS, autocast_dtype
from .mesh import ParallelDims


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules sharded (and gathered) one at a time: the model's ``shard_units()`` if it names them (the
    transformer blocks), otherwise none, and the module is one unit."""
    units = getattr(module, "shard_units", None)
    return list(units()) if callable(units) else []


def fsdp2_mesh(device_type: str, dims: ParallelDims) -> Any:
    """The (data, fsdp) DeviceMesh: 2-D = HSDP (parameters sharded within an fsdp group, replicated across groups),
    or the fsdp axis alone when there is one group."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = dims.mesh_shape
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("data", "fsdp"))
    return mesh["fsdp"] if shape[0] == 1 else mesh


def fully_shard_blocks(module: nn.Module, mesh: Any, precision: str) -> nn.Module:
    """``fully_shard`` each shard unit, then the root, computing in ``precision``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = autocast_dtype(precision) if precision in PRECISIONS else None
    # Compute in the training precision; gradients are reduced in fp32 as under DDP + autocast.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for unit in shard_units(module):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    return cast(nn.Module, fully_shard(module, mesh=mesh, mp_policy=policy))


def load_named_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict, full: bool
) -> None:
    """Load name-keyed model and optimizer states: each tensor as the model places it, or whole when ``full``."""
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
        placed = cast(dict[str, Any], get_model_state_dict(model))
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
