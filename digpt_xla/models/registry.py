"""Named D-iGPT sizes: ``create_digpt("digpt_vit_base_patch16_224")`` is the published release."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from .digpt import DiGPT, DiGPTConfig

# Teacher geometry is part of a size: the decoders predict the teacher's width on the teacher's grid.
_CLIP_H14 = dict(teacher_grid=16, teacher_dim=1024)
_RELEASE_DECODER = dict(decoder_dim=1024, decoder_depth=2, decoder_heads=32)

MODEL_SIZES: dict[str, dict[str, Any]] = {
    # Demo size: 32 px digits, 8x8 patch grid, 2x2 segments of 4x4, PixelTeacher(4) targets (4*4*3 = 48).
    "digpt_tiny": dict(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=6,
        num_heads=4,
        decoder_dim=64,
        decoder_depth=2,
        decoder_heads=4,
        teacher_grid=8,
        teacher_dim=48,
    ),
    "digpt_vit_small_patch16_224": dict(
        embed_dim=384, depth=12, num_heads=6, decoder_dim=512, decoder_depth=2, decoder_heads=16, **_CLIP_H14
    ),
    "digpt_vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12, **_RELEASE_DECODER, **_CLIP_H14),
    "digpt_vit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16, **_RELEASE_DECODER, **_CLIP_H14),
    "digpt_vit_huge_patch14_224": dict(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_RELEASE_DECODER, **_CLIP_H14
    ),
}


def digpt_config(name: str, **overrides: Any) -> DiGPTConfig:
    """The config of a named size with ``overrides`` applied (None values are ignored)."""
    if name not in MODEL_SIZES:
        close = difflib.get_close_matches(name, MODEL_SIZES, n=3)
        raise KeyError(f"unknown model {name!r}; closest: {close or sorted(MODEL_SIZES)}")
    valid = {f.name for f in dataclasses.fields(DiGPTConfig)}
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            raise KeyError(f"unknown model setting {key!r}; closest: {close or sorted(valid)}")
    kwargs = {**MODEL_SIZES[name], **{k: v for k, v in overrides.items() if v is not None}}
    return DiGPTConfig(**kwargs)


def create_digpt(name: str, **overrides: Any) -> DiGPT:
    return DiGPT(digpt_config(name, **overrides))
