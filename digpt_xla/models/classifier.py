"""Finetuning classifier: a timm ``VisionTransformer`` shaped like the D-iGPT encoder (average pooling + fc_norm,
as the release finetunes), and the transfer of pretrained encoder weights into it.

The pretraining encoder already uses timm's parameter names (``patch_embed.proj``, ``blocks.i.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}``) and stores ``pos_embed`` with the CLS row first; only its token *sequence*
puts CLS last, which full attention does not see (it is permutation-equivariant and positions come from the
fixed sin-cos table). Transfer therefore keeps the encoder tensors as they are and drops the decoders, their
projections and norms, the query tokens and the mask.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ..checkpoint.reader import CheckpointError, check_state_dict
from .digpt import DiGPTConfig

ENCODER_KEYS = ("patch_embed.", "blocks.", "cls_token", "pos_embed")
HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")


def create_classifier(cfg: DiGPTConfig, num_classes: int, drop_path_rate: float = 0.0) -> VisionTransformer:
    """The timm ViT with this encoder's shape; for ViT-B/16 the same as
    ``timm.create_model("vit_base_patch16_224", global_pool="avg", fc_norm=True, num_classes=...)``."""
    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        global_pool="avg",
        fc_norm=True,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
    )


def split_pretrain_state(
    state: Mapping[str, Tensor], source: str = "state dict"
) -> tuple[dict[str, Tensor], list[str]]:
    """(encoder tensors, names of everything dropped) of a pretraining state dict (ours or the release's)."""
    encoder = {k: v for k, v in state.items() if k.startswith(ENCODER_KEYS)}
    if "cls_token" not in encoder or not any(k.startswith("blocks.") for k in encoder):
        raise CheckpointError(f"{source}: not a D-iGPT pretraining state dict (no cls_token / blocks.* keys)")
    return encoder, sorted(k for k in state if k not in encoder)


def encoder_config_from_state(state: Mapping[str, Tensor]) -> DiGPTConfig:
    """The encoder shape a pretraining state dict implies (for checkpoints without a saved config)."""
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    heads = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}.get(dim, max(1, dim // 64))
    return DiGPTConfig(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=hidden / dim,
        teacher_grid=grid,
        teacher_dim=dim,
    )


def classifier_state(
    pretrain_state: Mapping[str, Tensor], num_classes: int, head_init_std: float = 2e-5, source: str = "state dict"
) -> tuple[dict[str, Tensor], list[str]]:
    """A complete classifier state dict (encoder from pretraining; fc_norm = identity LayerNorm; head drawn from a
    truncated normal of ``head_init_std``, MAE's finetuning init) and the dropped pretraining keys."""
    encoder, dropped = split_pretrain_state(pretrain_state, source)
    dim = encoder["cls_token"].shape[-1]
    head = torch.empty(num_classes, dim)
    trunc_normal_(head, std=head_init_std)
    state = {k: v.clone() for k, v in encoder.items()}
    state |= {
        "fc_norm.weight": torch.ones(dim),
        "fc_norm.bias": torch.zeros(dim),
        "head.weight": head,
        "head.bias": torch.zeros(num_classes),
    }
    return state, dropped


def load_pretrained_encoder(
    model: VisionTransformer, pretrain_state: Mapping[str, Tensor], source: str = "state dict"
) -> list[str]:
    """Load the encoder of a pretraining state dict into ``model``, keeping its own fc_norm and head; every other
    key must match exactly (names and shapes). Returns the dropped pretraining keys."""
    encoder, dropped = split_pretrain_state(pretrain_state, source)
    expected = {k: v for k, v in model.state_dict().items() if k not in HEAD_KEYS}
    check_state_dict(expected, encoder, f"{source} (encoder for {type(model).__name__})")
    model.load_state_dict(encoder, strict=False)
    return dropped
