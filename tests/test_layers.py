import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digpt_xla.models.layers import (
    Attention,
    CrossAttention,
    default_feature_taps,
    segment_causal_block_mask,
    segment_causal_mask,
    segment_raster_index,
    set_attention,
    sincos_table_2d,
)


def test_mask_matches_definition():
    segments, tokens = 3, 49
    mask = segment_causal_mask(segments, tokens)
    L = segments * tokens + 1
    assert mask.shape == (L, L)
    seg = [i // tokens for i in range(L - 1)] + [segments - 1]  # CLS belongs to the last visible segment
    for q in range(0, L, 7):
        for k in range(L):
            expected = 0.0 if seg[k] <= seg[q] else -math.inf
            assert mask[q, k].item() == expected, (q, k)
    assert torch.all(mask[-1] == 0), "CLS sees everything"
    visible_cls = mask[:-1, -1] == 0
    assert torch.equal(visible_cls, torch.tensor(seg[:-1]) == segments - 1), "only the last segment sees CLS"


def test_mask_equals_release_construction():
    # The release builds it as a block lower-triangular matrix, reflect-padded by one on the right and bottom.
    block = torch.tril(torch.ones(3, 3))
    block = torch.zeros(3, 3).masked_fill(block == 0, float("-inf"))
    full = block.repeat_interleave(49, dim=0).repeat_interleave(49, dim=1)
    padded = F.pad(full[None, None], (0, 1, 0, 1), mode="reflect")[0, 0]
    assert torch.equal(segment_causal_mask(3, 49), padded)


def _mae_sincos(dim, grid):  # the MAE formula, in numpy
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_table_equals_mae_formula():
    for dim, grid in ((768, 14), (64, 8)):
        ours = sincos_table_2d(dim, grid)[0].numpy()
        np.testing.assert_allclose(ours, _mae_sincos(dim, grid).astype(np.float32), rtol=0, atol=1e-6)


def test_segment_raster_index():
    idx = segment_raster_index(4, 2)
    assert idx.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert sorted(segment_raster_index(14, 2).flatten().tolist()) == list(range(196))


def test_feature_taps_rule():
    assert default_feature_taps(12) == (6, 8, 10, 12)
    assert default_feature_taps(24) == (12, 16, 20, 24)
    assert default_feature_taps(6) == (3, 4, 5, 6)


def test_sdpa_equals_explicit_attention():
    mask = segment_causal_mask(3, 4)
    attn = Attention(32, 4)
    cross = CrossAttention(32, 4)
    x, ctx = torch.randn(2, 13, 32), torch.randn(2, 13, 32)
    outs = {}
    for mode in ("sdpa", "explicit", "flex"):
        set_attention(attn, mode)
        set_attention(cross, mode)
        m = segment_causal_block_mask(3, 4, "cpu") if mode == "flex" else mask
        outs[mode] = (attn(x, m), cross(x, ctx, m))
    for mode in ("sdpa", "flex"):
        for a, b in zip(outs[mode], outs["explicit"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the explicit path really applies the mask: the first token cannot see the last segment
    x2 = x.clone()
    x2[:, 8:12] += 10.0
    set_attention(attn, "explicit")
    torch.testing.assert_close(attn(x2, mask)[:, :4], attn(x, mask)[:, :4])


@pytest.mark.parametrize(("segments", "tokens"), [(3, 4), (3, 49), (3, 16)], ids=["tiny", "vit-b", "vit-b-flex-block"])
def test_block_mask_equals_the_dense_mask_element_by_element(segments, tokens):
    from torch.nn.attention.flex_attention import create_mask

    block_mask = segment_causal_block_mask(segments, tokens, "cpu")
    length = segments * tokens + 1
    allowed = create_mask(block_mask.mask_mod, None, None, length, length, device="cpu")[0, 0]
    assert torch.equal(allowed, segment_causal_mask(segments, tokens) == 0)
    # the block structure agrees too: a block the BlockMask skips holds no allowed pair
    dense_blocks = block_mask.to_dense()[0, 0].bool()
    size = block_mask.BLOCK_SIZE[0]
    for i in range(dense_blocks.shape[0]):
        for j in range(dense_blocks.shape[1]):
            tile = allowed[i * size : (i + 1) * size, j * size : (j + 1) * size]
            assert bool(tile.any()) == bool(dense_blocks[i, j]), (i, j)
