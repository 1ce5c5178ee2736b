"""Frozen teachers whose token features the student predicts.

Both teachers share one contract: ``teacher(images)`` takes the student's ImageNet-normalised batch
(B, 3, H, W) and returns (B, 1 + grid**2, dim) float tokens, CLS first, without gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from .checkpoint.reader import check_state_dict, read_state_dict
from .models.layers import BlockRunner, conv_patches, run_in_order

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BatchFirstBlock(nn.Module):
    """Runs one of open_clip's ``ResidualAttentionBlock``s (pre-norm attention and MLP, optional LayerScale) with
    its own weights, attention computed batch-first: ``scaled_dot_product_attention`` on (B, heads, L, d).

    ``nn.MultiheadAttention`` goes through (L, B * heads, d), a dimension that merges the batch with the heads;
    under SPMD the partitioner then gathers the activations of the whole global batch in every block (ViT-H/14: 32
    all-gathers of 15 MB per step on a 4-chip slice), where batch-first attention keeps each device on its rows."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    @staticmethod
    def supports(block: nn.Module) -> bool:
        attn = getattr(block, "attn", None)
        return (
            isinstance(attn, nn.MultiheadAttention)
            and attn.in_proj_weight is not None
            and attn.batch_first
            and isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity)  # no scale_attn norm
        )

    def forward(self, x: Tensor) -> Tensor:
        b: Any = self.block  # open_clip's ResidualAttentionBlock (``supports`` checked it)
        attn: nn.MultiheadAttention = b.attn
        B, L, E = x.shape
        heads = attn.num_heads
        qkv = F.linear(b.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(B, L, 3, heads, E // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, E)
        x = x + b.ls_1(attn.out_proj(out))
        return x + b.ls_2(b.mlp(b.ln_2(x)))


class ClipTeacher(nn.Module):
    scale: Tensor  # buffers: CLIP's normalisation in terms of the student's
    shift: Tensor
    block_runner: BlockRunner = staticmethod(run_in_order)  # the tower's blocks; a backend may swap in its own
    """Frozen open_clip image tower returning every token after ``ln_post`` and ``proj``, CLS first.

    Only the vision tower is built (no text tower, nothing downloaded). ``checkpoint`` may hold a full
    open_clip state dict (``visual.*`` keys plus the text tower) or the image tower alone.
    ``vision_overrides`` changes the tower's open_clip config (e.g. fewer layers, for tests).
    """

    def __init__(
        self,
        model_name: str = "ViT-H-14",
        checkpoint: str | None = None,
        vision_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        vision_cfg = CLIPVisionCfg(**{**model_cfg["vision_cfg"], **(vision_overrides or {})})
        self.visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, model_cfg.get("quick_gelu", False))
        if self.visual.proj is None or getattr(self.visual, "attn_pool", None) is not None:
            raise ValueError(f"{model_name}: only plain ViT towers with a projection are supported as teachers")
        if getattr(self.visual, "final_ln_after_pool", False):
            raise ValueError(f"{model_name}: ln_post after pooling leaves patch tokens unnormalised; unsupported")
        conv = self.visual.conv1
        if conv.kernel_size != conv.stride or conv.padding != (0, 0) or conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError(
                f"{model_name}: only a patch convolution (square kernel = stride, no padding) is supported"
            )
        tower = self.visual.transformer
        if not (tower.batch_first and all(BatchFirstBlock.supports(b) for b in tower.resblocks)):
            raise ValueError(
                f"{model_name}: only towers of batch-first open_clip ResidualAttentionBlocks are supported"
            )
        # Views onto the tower's blocks, kept out of the module tree: the state dict stays open_clip's.
        self._blocks = [BatchFirstBlock(b) for b in tower.resblocks]
        self.model_name = model_name
        self.image_size = vision_cfg.image_size if isinstance(vision_cfg.image_size, int) else vision_cfg.image_size[0]
        self.grid_size = self.image_size // vision_cfg.patch_size
        self.dim = model_cfg["embed_dim"]
        self.vision_cfg = asdict(vision_cfg)
        if checkpoint:
            self.load_checkpoint(checkpoint)
        # Maps ImageNet-normalised input straight to CLIP-normalised input: x * scale + shift.
        in_mean, in_std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        self.register_buffer("scale", (in_std / clip_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((in_mean - clip_mean) / clip_std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def load_checkpoint(self, url: str) -> None:
        state = read_state_dict(url)
        if any(k.startswith("visual.") for k in state):
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        check_state_dict(self.visual.state_dict(), state, url)
        self.visual.load_state_dict(state, strict=True)

    def matmul_weights(self) -> list[Tensor]:
        """The weights that only matmuls and convolutions read: autocast casts them to its dtype at every use,
        so storing them in it gives the same features. Norms, biases, embeddings added to the stream stay fp32."""
        weights: list[Tensor] = [self.visual.proj]
        for m in self.visual.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                weights.append(m.weight)
            elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                weights.append(m.in_proj_weight)
        return weights

    def runner_blocks(self) -> list[BatchFirstBlock]:
        """The blocks ``block_runner`` runs, in order: a backend may stack their weights once, as they are frozen."""
        return self._blocks

    def shard_units(self) -> list[nn.Module]:
        """The tower's residual blocks, each sharded as one unit (FSDP)."""
        return list(self.visual.transformer.resblocks)

    def train(self, mode: bool = True) -> ClipTeacher:
        return super().train(False)  # always frozen, whatever the caller's mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images * self.scale + self.shift
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = self.block_runner(self._blocks, self.embed(x), (), ())[-1]
        return (self.visual.ln_post(x) @ self.visual.proj).float()

    def embed(self, x: Tensor) -> Tensor:
        """open_clip's ``_embeds`` (patches, CLS, positions, ``ln_pre``) with the patch convolution computed as the
        matmul it is (``conv_patches``): the same numbers to fp32 rounding, and no convolution for libtpu."""
        v: Any = self.visual
        conv: nn.Conv2d = v.conv1
        x = F.linear(conv_patches(x, conv.kernel_size[0]), conv.weight.flatten(1), conv.bias)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))


class PixelTeacher(nn.Module):
    """Per-patch normalised pixels as targets; needs no weights.

    Patch tokens: each ``patch_size`` x ``patch_size`` patch of the input, flattened as (row, column,
    channel) and normalised to zero mean and unit variance over its values (MAE's ``norm_pix``).
    CLS token: a global target, the whole image average-pooled to one patch_size x patch_size thumbnail
    and normalised the same way. Width ``3 * patch_size**2``.
    """

    def __init__(self, patch_size: int, image_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.image_size = image_size
        self.grid_size = image_size // patch_size
        self.dim = 3 * patch_size**2
        self.eps = eps

    def _normalise(self, x: Tensor) -> Tensor:
        mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True, unbiased=False)
        return (x - mean) / (var + self.eps).sqrt()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        B, C, H, W = images.shape
        if self.image_size != H or self.image_size != W:
            raise ValueError(f"PixelTeacher expects {self.image_size}px images, got {H}x{W}")
        p, g = self.patch_size, self.grid_size
        x = images.float()
        patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * C)
        thumb = F.adaptive_avg_pool2d(x, p).permute(0, 2, 3, 1).reshape(B, 1, p * p * C)
        return self._normalise(torch.cat([thumb, patches], dim=1))
