"""How the XLA backends run a stack of blocks: rematerialised under torch_xla's checkpoint, or scanned as XLA
loops (torch_xla's ``scan``). Part of the XLA backend: torch_xla is imported only inside these functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from ...models.layers import run_in_order, tap_segments


def run_rematerialised(
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


def scan_blocks(
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
