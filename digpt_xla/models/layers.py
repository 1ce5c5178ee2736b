"""Building blocks of the D-iGPT model: masked attention, encoder and decoder blocks, sin-cos tables, masks.

Parameter names (``qkv``, ``proj``, ``q``, ``kv``, ``norm1`` ...) follow the published release so that its
checkpoints load with ``strict=True``. The MLP and patch embedding come from timm, whose key names match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from ..precision import ATTENTION_MODES

AttentionMask = Any  # an additive (N, N) float Tensor (sdpa, explicit), or a flex BlockMask / None (flex)


# Not a ``model.attention`` choice: "sdpa" computed as SDPA's math kernel computes it, op by op, with a plain softmax
# where the kernel calls ``_safe_softmax`` (the same numbers when no row is fully masked, as here). On XLA, where SDPA
# always runs its math kernel, it equals "sdpa" bit for bit (tested); a backend may run "sdpa" blocks this way.
SDPA_WRITTEN_OUT = "sdpa-written-out"


def attention_product(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, mode: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (B, H, N, d) inputs.

    ``sdpa``: ``scaled_dot_product_attention`` with the additive (N, N) float mask. ``explicit``: the formula
    spelled out, what tests compare the others against. ``flex``: ``flex_attention`` with a ``BlockMask`` of the
    same pattern (``None`` = full attention), which skips the fully masked blocks; eager it runs torch's reference
    path, so use it under ``torch.compile`` (``backend.compile=true``) for speed.
    """
    if mode == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return cast(Tensor, flex_attention(q, k, v, block_mask=mask))  # not asked for the log-sum-exp
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    if mode == SDPA_WRITTEN_OUT:
        # SDPA's math kernel step by step: q and k each scaled by d^-1/4 in fp32, then back to their dtype.
        scale = q.shape[-1] ** -0.25
        q, k = (q.float() * scale).to(q.dtype), (k.float() * scale).to(k.dtype)
        return torch.softmax(q @ k.transpose(-2, -1) + mask.to(q.dtype), dim=-1) @ v
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    scores = scores + mask.to(scores.dtype)
    return scores.softmax(dim=-1) @ v


def check_heads(dim: int, num_heads: int) -> None:
    if dim % num_heads:
        raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")


class Attention(nn.Module):
    """Multi-head self-attention with an additive mask."""

    mode: str = "sdpa"  # one of ATTENTION_MODES (set_attention)

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: AttentionMask) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        # unbind, not qkv[0..2]: the backward of three selects zero-fills and sums three full-size buffers.
        q, k, v = qkv.unbind(0)
        out = attention_product(q, k, v, mask, self.mode)  # (B, H, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Queries from the decoder stream, keys and values from an encoder latent of the same length."""

    mode: str = "sdpa"  # one of ATTENTION_MODES (set_attention)

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: AttentionMask) -> Tensor:
        B, N, C = x.shape
        heads, head_dim = self.num_heads, C // self.num_heads
        q = self.q(x).reshape(B, N, heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(B, context.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention_product(q, k, v, mask, self.mode)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, mask: AttentionMask) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention to one encoder latent, MLP; all pre-norm and all under the same mask."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, num_heads)
        self.norm2_1 = nn.LayerNorm(dim, eps=eps)
        self.norm2_2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, latent: Tensor, mask: AttentionMask) -> Tensor:
        x = x + self.attn1(self.norm1(x), mask)
        x = x + self.attn2(self.norm2_1(x), self.norm2_2(latent), mask)
        return x + self.mlp(self.norm2(x))


class BlockRunner(Protocol):
    """Runs a stack of same-shaped blocks and returns the outputs after the blocks listed in ``taps`` (1-based,
    ascending; empty: the last block's). ``extra``: inputs every block takes last; ``per_block``: tensors with one
    row per block on their first dimension, block i called as ``block(x, *rows i, *extra)``. A backend may swap in
    its own (XLA's scan over the stacked weights, or rematerialisation); every runner computes what
    ``run_in_order`` computes."""

    def __call__(
        self,
        blocks: Sequence[nn.Module],
        x: Tensor,
        extra: tuple = (),
        taps: Sequence[int] = (),
        per_block: tuple = (),
    ) -> list[Tensor]: ...


def run_in_order(
    blocks: Sequence[nn.Module],
    x: Tensor,
    extra: tuple = (),
    taps: Sequence[int] = (),
    per_block: tuple = (),
    checkpoint: Callable[..., Tensor] | None = None,
) -> list[Tensor]:
    """The blocks one after another; ``checkpoint(block, x, *rows, *extra)``, when given, runs each block so that
    only its inputs are kept and its activations are recomputed in the backward pass (``torch_checkpoint``, or a
    backend's)."""
    check_per_block(blocks, per_block)
    outputs, wanted = [], set(taps) or {len(blocks)}
    for i, block in enumerate(blocks, start=1):
        args = (x, *(rows[i - 1] for rows in per_block), *extra)
        x = checkpoint(block, *args) if checkpoint is not None else block(*args)
        if i in wanted:
            outputs.append(x)
    return outputs


def check_per_block(blocks: Sequence[nn.Module], per_block: tuple) -> None:
    short = [tuple(t.shape) for t in per_block if t.shape[0] != len(blocks)]
    if short:
        raise ValueError(f"per-block inputs of shapes {short} do not have one row for each of {len(blocks)} blocks")


def torch_checkpoint(block: nn.Module, *args: Tensor) -> Tensor:
    """``torch.utils.checkpoint`` of one block when gradients are recorded; a plain call otherwise."""
    if not torch.is_grad_enabled():
        return block(*args)
    return cast(Tensor, torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False))


def set_attention(model: nn.Module, mode: str) -> None:
    """Switch every attention module of ``model`` (and the model's own mask choice) to ``mode``."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {', '.join(ATTENTION_MODES)}")
    for module in model.modules():
        if isinstance(module, (Attention, CrossAttention)) or getattr(module, "chooses_attention_masks", False):
            cast(Any, module).mode = mode


def segment_ids(num_visible_segments: int, tokens_per_segment: int) -> Tensor:
    """(L,) segment of every token of the sequence; the trailing CLS belongs to the last visible segment."""
    segment = torch.arange(num_visible_segments).repeat_interleave(tokens_per_segment)
    return torch.cat([segment, torch.tensor([num_visible_segments - 1])])


def segment_causal_block_mask(
    num_visible_segments: int, tokens_per_segment: int, device: torch.device | str, block_size: int | None = None
):
    """The flex ``BlockMask`` of ``segment_causal_mask``: token q sees token kv when segment(kv) <= segment(q).

    Blocks default to the segment length rounded up to a multiple of 16 (capped at 128, flex's default), so block
    boundaries follow segment boundaries where the kernel allows it and whole blocks are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment = segment_ids(num_visible_segments, tokens_per_segment).to(device)
    length = segment.numel()

    def visible(b, h, q_idx, kv_idx):
        return segment[kv_idx] <= segment[q_idx]

    block = block_size or min(128, -(-tokens_per_segment // 16) * 16)
    return create_block_mask(visible, None, None, length, length, device=device, BLOCK_SIZE=block)


def sincos_table_1d(dim: int, positions: Tensor) -> Tensor:
    """(len(positions), dim): sin of position x frequency in the first half, cos in the second."""
    if dim % 2:
        raise ValueError(f"sin-cos width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_table_2d(dim: int, grid_size: int, cls_row: bool = True) -> Tensor:
    """MAE-style fixed 2D sin-cos table, (1 [+1], grid_size**2, dim) in float32, raster order.

    The first half of the channels encodes the column, the second half the row (the MAE convention, kept
    so tables equal the release's); an all-zero row for CLS leads when ``cls_row``.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos width must be divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    table = torch.cat([sincos_table_1d(dim // 2, cols.flatten()), sincos_table_1d(dim // 2, rows.flatten())], dim=1)
    if cls_row:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


def segment_causal_mask(num_visible_segments: int, tokens_per_segment: int) -> Tensor:
    """Additive (L, L) mask, L = visible segments x tokens + 1 CLS, 0 where attention is allowed, -inf not.

    Token of segment i sees every token of segments <= i. The trailing CLS token counts as a member of the
    last visible segment: it sees everything and is seen by that segment only.
    """
    segment = segment_ids(num_visible_segments, tokens_per_segment)
    allowed = segment[None, :] <= segment[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def segment_raster_index(grid_size: int, segments_per_side: int) -> Tensor:
    """(S, T) long: raster patch index of token t of segment s; segments and their tokens in raster order."""
    if grid_size % segments_per_side:
        raise ValueError(f"a {grid_size}x{grid_size} grid does not split into {segments_per_side}^2 segments")
    side = grid_size // segments_per_side
    grid = torch.arange(grid_size * grid_size).reshape(segments_per_side, side, segments_per_side, side)
    return grid.permute(0, 2, 1, 3).reshape(segments_per_side**2, side * side)


def default_feature_taps(depth: int) -> tuple[int, ...]:
    """1-based encoder blocks whose outputs feed the decoders: (6, 8, 10, 12) for depth 12."""
    return tuple(sorted({max(1, round(depth * f)) for f in (1 / 2, 2 / 3, 5 / 6)} | {depth}))


def conv_patches(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p) (W/p), C p p): each non-overlapping patch flattened as a ``Conv2d`` with kernel and
    stride ``p`` flattens its weight, so ``F.linear(patches, conv.weight.flatten(1))`` is that convolution, as a
    plain matmul: libtpu ran ViT-H/14's CLIP patch convolution inside a windowed loop, one of the slowest fusions
    of its per-fusion log."""
    B, C, H, W = images.shape
    p = patch_size
    return images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)


def select_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for x (B, N, D) and index (B, L), as a matmul with one-hot rows. Each output is one
    input times 1 plus zeros: the gathered numbers, rounded only to the dtype the matmul computes in (autocast's,
    or bf16 passes of an fp32 matmul on TPU), which a matmul reading the rows next rounds them to anyway. Unlike
    ``torch.gather`` with the index expanded over D it needs no element-wise gather: on XLA that took one index
    per element (``u32[8,192,588,3]`` for ViT-H/14's pixels, a 10.8 MB index built and read every step), while
    the matmul's batch dimension keeps the SPMD partitioner on each device's own rows. Meant for inputs that need
    no gradient (its backward is a matmul the size of ``x``). The one-hot rows are a comparison with
    ``arange``: ``F.one_hot`` is a scatter on XLA, for which the partitioner gathered every device's indices."""
    one_hot = index[..., None] == torch.arange(x.shape[1], device=index.device)
    return torch.matmul(one_hot.to(x.dtype), x)
