"""How the XLA backends run a stack of blocks: rematerialised under torch_xla's checkpoint, or scanned as XLA
loops (torch_xla's ``scan``). Part of the XLA backend: torch_xla is imported only inside these functions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ...models.layers import SDPA_WRITTEN_OUT, run_in_order, tap_segments


def run_rematerialised(
    blocks: Sequence[nn.Module], x: Tensor, extra: tuple = (), taps: Sequence[int] = ()
) -> list[Tensor]:
    """``run_in_order`` with each block under torch_xla's checkpoint: its optimization barrier keeps XLA from
    folding the recomputation back into the forward pass (torch's own checkpoint would be undone by CSE)."""
    # Its backward puts the barrier on the block's inputs in place: handed the model's mask buffer itself, it
    # made the buffer an output of step 1 and step 2 compiled a second graph. The blocks get a copy.
    extra = tuple(e.clone() if isinstance(e, Tensor) else e for e in extra)
    return run_in_order(blocks, x, extra, taps, checkpoint=_rematerialised)


def _rematerialised(block: nn.Module, *args: Tensor) -> Tensor:
    from torch_xla.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return cast(Tensor, block(*args))
    return cast(Tensor, checkpoint(block, *args, use_reentrant=True, preserve_rng_state=False))


def scan_blocks(
    blocks: Sequence[nn.Module], x: Tensor, extra: tuple = (), taps: Sequence[int] = (), remat: bool = False
) -> list[Tensor]:
    """``run_in_order`` as XLA loops: the blocks between two taps become one ``while`` over their stacked
    weights (torch_xla's ``scan``), so one block is traced and compiled however deep the stack is. The weights
    are stacked inside the step, as torch_xla's ``scan_layers`` does: parameters and state-dict keys stay the
    blocks' own. ``remat``: the loop keeps each block's inputs and the backward pass recomputes the rest."""
    from functorch.compile import default_partition
    from torch.func import functional_call
    from torch_xla.experimental.scan import scan

    partition = _keep_only_inputs if remat else default_partition
    outputs = []
    for start, stop in tap_segments(len(blocks), taps):
        run = list(blocks[start:stop])
        if len(run) == 1:  # nothing to loop over
            x = run_rematerialised(run, x, extra)[-1] if remat else run[0](x, *extra)
        else:
            template = run[0]  # traced once with each iteration's weights swapped in
            names = [n for n, _ in template.named_parameters()]
            weights = [dict(b.named_parameters()) for b in run]
            stacked = {n: torch.stack([w[n] for w in weights]) for n in names}

            def one_block(carry: tuple, layer_weights: dict, template: nn.Module = template) -> tuple:
                h, *rest = carry
                return (functional_call(template, layer_weights, (h, *rest), strict=False), *rest), None

            with _sdpa_written_out(template):
                (x, *_), _ = scan(one_block, (x, *extra), stacked, partition_fn=partition)
        outputs.append(x)
    return outputs


def _keep_only_inputs(joint: Any, joint_inputs: Any, **kwargs: Any) -> Any:
    """AOTAutograd's min-cut partition with no memory for activations: a block's forward saves nothing but its
    inputs, as a checkpoint of the block would. At its default budget the partition keeps every matmul's output, and
    a scanned ViT-H/14 kept the attention probabilities of every block (f32[16,56,16,193,193], 2 GB a chip)."""
    import torch._functorch.config as functorch_config
    from functorch.compile import min_cut_rematerialization_partition

    with functorch_config.patch(activation_memory_budget=0.0):
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)


@contextlib.contextmanager
def _sdpa_written_out(block: nn.Module) -> Iterator[None]:
    """The block's "sdpa" attention written out while ``scan`` traces it. torch_xla 2.9's scan differentiates its
    body with AOTAutograd, and under bf16 autocast the backward it records for SDPA's math kernel multiplies a bf16
    gradient by the f32 softmax (``bf16[B,H,N,N] x f32[B,H,N,N]``): XLA's verifier rejects that program when libtpu
    compiles it. The same math op by op differentiates cleanly and equals SDPA on XLA bit for bit (tested)."""
    switched: list[Any] = [m for m in block.modules() if getattr(m, "mode", None) == "sdpa"]
    for m in switched:
        m.mode = SDPA_WRITTEN_OUT
    try:
        yield
    finally:
        for m in switched:
            m.mode = "sdpa"
