"""How the XLA backends run a stack of blocks: rematerialised under torch_xla's checkpoint, or scanned as XLA
loops (torch_xla's ``scan``). Part of the XLA backend: torch_xla is imported only inside these functions."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ...models.layers import SDPA_WRITTEN_OUT, check_per_block, run_in_order


def run_rematerialised(
    blocks: Sequence[nn.Module], x: Tensor, extra: tuple = (), taps: Sequence[int] = (), per_block: tuple = ()
) -> list[Tensor]:
    """``run_in_order`` with each block under torch_xla's checkpoint: its optimization barrier keeps XLA from
    folding the recomputation back into the forward pass (torch's own checkpoint would be undone by CSE)."""
    # Its backward puts the barrier on the block's inputs in place: handed the model's mask buffer itself, it
    # made the buffer an output of step 1 and step 2 compiled a second graph. The blocks get a copy.
    extra = tuple(e.clone() if isinstance(e, Tensor) else e for e in extra)
    return run_in_order(blocks, x, extra, taps, per_block, checkpoint=_rematerialised)


def _rematerialised(block: nn.Module, *args: Tensor) -> Tensor:
    from torch_xla.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return cast(Tensor, block(*args))
    return cast(Tensor, checkpoint(block, *args, use_reentrant=True, preserve_rng_state=False))


def scan_blocks(
    blocks: Sequence[nn.Module],
    x: Tensor,
    extra: tuple = (),
    taps: Sequence[int] = (),
    per_block: tuple = (),
    remat: bool = False,
) -> list[Tensor]:
    """``run_in_order`` as one XLA loop: a ``while`` over the blocks' stacked weights and their rows of
    ``per_block`` (torch_xla's ``scan``), so one block is traced and compiled however deep the stack is. The
    weights are stacked inside the step, as torch_xla's ``scan_layers`` does: parameters and state-dict keys stay
    the blocks' own. ``remat``: the loop keeps each block's inputs and the backward pass recomputes the rest.
    The outputs after several taps are collected by the same loop (``_scan_run``), not by one loop per run of
    blocks between taps: libtpu lowers every loop body on its own."""
    check_per_block(blocks, per_block)
    ends = list(taps) or [len(blocks)]
    run, rows = list(blocks[: ends[-1]]), tuple(t[: ends[-1]] for t in per_block)
    if len(run) == 1:  # nothing to loop over
        return (run_rematerialised if remat else run_in_order)(run, x, extra, ends, rows)
    return _scan_run(run[0], _stacked_weights(run), x, extra, remat, rows, ends)


def _stacked_weights(run: Sequence[nn.Module]) -> dict[str, Tensor]:
    return {name: _stacked(run, name) for name, _ in run[0].named_parameters()}


def _stacked(run: Sequence[nn.Module], name: str) -> Tensor:
    """One weight of every block of ``run``, stacked on a new first dimension."""
    return torch.stack([b.get_parameter(name) for b in run])


def _scan_run(
    template: nn.Module,
    stacked: dict[str, Tensor],
    x: Tensor,
    extra: tuple,
    remat: bool,
    rows: tuple = (),
    taps: Sequence[int] = (),
) -> list[Tensor]:
    """One ``while`` over a run of blocks shaped like ``template``, iteration i with ``stacked[name][i]`` swapped in
    for each of its parameters and row i of each of ``rows`` passed after ``x``. Returns the outputs after the
    blocks in ``taps`` (1-based, the last one the run's last block; empty: that block's). The outputs at the taps
    before the last are written, as they are made, into a buffer the loop carries: one row per such tap and one
    that every other block writes, each write a single-row update in place, which the backward pass reads back as
    a row of the buffer's gradient."""
    from functorch.compile import default_partition
    from torch.func import functional_call
    from torch_xla.experimental.scan import scan

    depth = next(iter(stacked.values())).shape[0]
    *earlier, last = list(taps) or [depth]
    if last != depth:
        raise ValueError(f"the last tap {last} is not the run's last block, {depth}")
    collect = bool(earlier)
    if collect:
        position = torch.arange(1, depth + 1, device=x.device)
        slot = torch.full_like(position, len(earlier))  # the row that nothing reads
        for k, tap in enumerate(earlier):
            slot = torch.where(position == tap, k, slot)
        rows = (*rows, slot)
        extra = (*extra, x.new_zeros((len(earlier) + 1, *x.shape)))

    def one_block(carry: tuple, layer: tuple) -> tuple:
        h, *rest = carry
        layer_weights, layer_rows = layer
        if collect:
            *rest, taken = rest
            *layer_rows, row = layer_rows
        h = functional_call(template, layer_weights, (h, *layer_rows, *rest), strict=False)
        return (h, *rest, *([taken.index_copy(0, row[None], h[None])] if collect else [])), None

    with _sdpa_written_out(template):
        (x, *rest), _ = scan(
            one_block,
            (x, *extra),
            (stacked, rows),
            partition_fn=_keep_only_inputs if remat else default_partition,
        )
    return [*(rest[-1][k] for k in range(len(earlier))), x]


class PrestackedScan:
    """The runner of a frozen stack whose weights were stacked once, before the first step, and live on the
    device only as those stacks (the module's non-persistent ``stacked_*`` buffers): the step stacks nothing.
    Stacked inside the step, a replicated teacher was copied once more each step while its loop ran (ViT-B at
    fsdp=4, 32 per v6e chip: libtpu's peak 7.27 GiB, against 6.15 stacked once). The blocks' own parameters are
    left on the meta device, holding no memory, and the module's state dict reads each of them from its stack: the
    same keys and values as before. It runs its own blocks, whole: their weights are gone from the blocks.

    ``adopt(stack, members)`` lays a stack out on the device mesh like its members and lets go of them;
    ``materialize()`` computes what is pending on the device. One weight is stacked at a time, its members let go
    of before the next, so setting up holds at most one weight's stack twice."""

    def __init__(
        self,
        module: nn.Module,
        blocks: Sequence[nn.Module],
        adopt: Callable[[Tensor, list[Tensor]], None],
        materialize: Callable[[], None],
    ):
        self.module, self.blocks = module, list(blocks)
        key_of = {id(p): key for key, p in module.named_parameters()}
        self.buffers: dict[str, str] = {}  # a block's parameter name -> the module's buffer holding its stack
        stacked_keys: dict[str, tuple[str, int]] = {}  # a state-dict key -> its stack and index there
        for name, _ in list(self.blocks[0].named_parameters()):
            members: list[Tensor] = [b.get_parameter(name) for b in self.blocks]
            stack = _stacked(self.blocks, name)
            adopt(stack, members)
            self.buffers[name] = "stacked_" + name.replace(".", "__")
            module.register_buffer(self.buffers[name], stack, persistent=False)
            materialize()
            for i, member in enumerate(members):
                if id(member) in key_of:
                    stacked_keys[key_of[id(member)]] = (self.buffers[name], i)
            owner, _, leaf = name.rpartition(".")
            for block in self.blocks:  # made empty: copying a device tensor to meta may read its data first
                meta = torch.empty(stack.shape[1:], dtype=stack.dtype, device="meta")
                setattr(block.get_submodule(owner), leaf, nn.Parameter(meta, requires_grad=False))
            del members  # their device buffers go before the next weight is stacked

        def unstacked_state(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
            for key, (buffer, i) in stacked_keys.items():
                state[prefix + key] = module.get_buffer(buffer)[i]

        module.register_state_dict_post_hook(unstacked_state)  # torch tags the hook: a function, not a method

    def __call__(
        self, blocks: Sequence[nn.Module], x: Tensor, extra: tuple = (), taps: Sequence[int] = (), per_block: tuple = ()
    ) -> list[Tensor]:
        own = len(blocks) == len(self.blocks) and all(a is b for a, b in zip(blocks, self.blocks, strict=False))
        if not own or list(taps) not in ([], [len(blocks)]):
            # Its blocks' parameters are on the meta device: scanning them, or a part of them, cannot run.
            raise ValueError(
                f"a prestacked stack of {len(self.blocks)} blocks runs only those blocks, whole; got {len(blocks)} "
                f"blocks with taps {list(taps)}"
            )
        check_per_block(blocks, per_block)
        stacked = {name: self.module.get_buffer(buffer) for name, buffer in self.buffers.items()}
        return _scan_run(self.blocks[0], stacked, x, extra, remat=False, rows=per_block)


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
