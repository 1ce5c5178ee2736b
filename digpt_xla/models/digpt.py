"""The D-iGPT pretraining model: a segment-causal ViT encoder and two decoders (AR and KD) that predict teacher
features of the next and of the visible image segments.

With the ViT-B/16 settings this is the published release, state-dict names included: shared
``{ar,kd}_enc_norm`` LayerNorms, the ``mask`` buffer, the crossed AR/KD latents and the interleaved
per-block latent channels. Everything is static-shaped so the same graph serves CPU, CUDA and XLA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from torch import Tensor, nn

from .layers import (
    Block,
    BlockRunner,
    DecoderBlock,
    conv_patches,
    default_feature_taps,
    run_in_order,
    segment_causal_block_mask,
    segment_causal_mask,
    segment_raster_index,
    select_rows,
    sincos_table_2d,
)


@dataclass
class DiGPTConfig:
    """Shape of a D-iGPT model. Defaults are the release's ViT-B/16 with a CLIP ViT-H/14 teacher."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 1024
    decoder_depth: int = 2
    decoder_heads: int = 32
    segments_per_side: int = 2
    teacher_grid: int = 16  # teacher patch tokens per side (ViT-H/14 at 224 px: 16)
    teacher_dim: int = 1024  # width of the teacher tokens the decoders predict
    feature_taps: tuple[int, ...] = field(default_factory=tuple)  # 1-based blocks; empty: default rule

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.feature_taps = tuple(self.feature_taps) or default_feature_taps(self.depth)
        bad = [t for t in self.feature_taps if not 1 <= t <= self.depth]
        if bad:
            raise ValueError(f"feature_taps {bad} outside the encoder's blocks 1..{self.depth}")
        for width, heads, what in (
            (self.embed_dim, self.num_heads, "embed_dim"),
            (self.decoder_dim, self.decoder_heads, "decoder_dim"),
        ):
            if width % heads:
                raise ValueError(f"{what} {width} is not divisible by its {heads} attention heads")
        if self.num_segments < 2:
            raise ValueError("segments_per_side must be >= 2: the model needs a next segment to predict")
        # The index tables validate divisibility of both grids by segments_per_side.
        segment_raster_index(self.grid_size, self.segments_per_side)
        segment_raster_index(self.teacher_grid, self.segments_per_side)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_segments(self) -> int:
        return self.segments_per_side**2

    @property
    def tokens_per_segment(self) -> int:
        return (self.grid_size // self.segments_per_side) ** 2

    @property
    def seq_len(self) -> int:
        """Encoder and decoder length: all visible segments plus the trailing CLS token."""
        return (self.num_segments - 1) * self.tokens_per_segment + 1


class DiGPTOutput(NamedTuple):
    ar_loss: Tensor
    kd_loss: Tensor


def bilinear_resize_matrix(src: int, dst: int) -> Tensor:
    """(dst*dst, src*src) weights of ``F.interpolate(mode="bilinear", align_corners=False)`` from a src x src to a
    dst x dst grid. A matmul with it is the same resize, and it lowers everywhere: XLA lowers the interpolate's
    backward only on TPU (a host fallback, and a sync, inside every step on XLA:CPU and XLA:GPU)."""
    x = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).clamp(min=0)
    lo = x.floor().long().clamp(max=src - 1)
    hi = (lo + 1).clamp(max=src - 1)
    frac = x - lo
    one_axis = torch.zeros(dst, src, dtype=torch.float64)
    one_axis[torch.arange(dst), lo] += 1 - frac
    one_axis[torch.arange(dst), hi] += frac
    return torch.kron(one_axis, one_axis).float()  # rows (i, j) of the output grid, columns (p, q) of the input


def cosine_distance(pred: Tensor, target: Tensor) -> Tensor:
    """Per-token 2 - 2 cos(pred, target), as the release computes it (plain L2 normalisation)."""
    pred = pred / pred.norm(dim=-1, keepdim=True)
    target = target / target.norm(dim=-1, keepdim=True)
    return 2 - 2 * (pred * target).sum(dim=-1)


def random_segment_order(batch: int, num_segments: int, device: torch.device | str, generator=None) -> Tensor:
    """(B, S) long, one uniform random permutation per sample, drawn where ``device`` says (no host trip)."""
    return torch.rand(batch, num_segments, device=device, generator=generator).argsort(dim=1)


class DiGPT(nn.Module):
    chooses_attention_masks = True  # set_attention sets ``mode`` here too: the mask's form follows it
    mode: str = "sdpa"
    block_runner: BlockRunner = staticmethod(run_in_order)  # the encoder's and decoders'; a backend may swap its own
    # Buffers (registered in __init__), typed for the checker.
    mask: Tensor
    student_segments: Tensor
    teacher_segments: Tensor
    segment_resize: Tensor

    def __init__(self, cfg: DiGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, ddim = cfg.embed_dim, cfg.decoder_dim
        num_taps = len(cfg.feature_taps)

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim)
        num_patches = cfg.grid_size**2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.ar_enc2dec = nn.Linear(num_taps * dim, cfg.decoder_depth * ddim)
        self.kd_enc2dec = nn.Linear(num_taps * dim, cfg.decoder_depth * ddim)
        # One LayerNorm per branch, listed once per tap: the release's state dict names each repeat.
        self.ar_enc_norm = nn.ModuleList([nn.LayerNorm(dim)] * num_taps)
        self.kd_enc_norm = nn.ModuleList([nn.LayerNorm(dim)] * num_taps)

        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, ddim), requires_grad=False)
        self.register_buffer("mask", segment_causal_mask(cfg.num_segments - 1, cfg.tokens_per_segment))
        self._block_masks: dict[torch.device, Any] = {}  # mode "flex": BlockMask per device (not state)
        self.kd_blocks = nn.ModuleList(
            DecoderBlock(ddim, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.ar_blocks = nn.ModuleList(
            DecoderBlock(ddim, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.ar_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.kd_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.ar_norm = nn.LayerNorm(ddim, eps=1e-6)
        self.ar_pred = nn.Linear(ddim, cfg.teacher_dim)
        self.kd_norm = nn.LayerNorm(ddim, eps=1e-6)
        self.kd_pred = nn.Linear(ddim, cfg.teacher_dim)

        # Index maps are derived from the config, so they stay out of the state dict.
        self.register_buffer(
            "student_segments", segment_raster_index(cfg.grid_size, cfg.segments_per_side), persistent=False
        )
        self.register_buffer(
            "teacher_segments", segment_raster_index(cfg.teacher_grid, cfg.segments_per_side), persistent=False
        )
        side, t_side = cfg.grid_size // cfg.segments_per_side, cfg.teacher_grid // cfg.segments_per_side
        self.register_buffer("segment_resize", bilinear_resize_matrix(side, t_side), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The release's initialisation: fixed sin-cos tables, xavier Linears (patch conv included)."""
        self.pos_embed.data.copy_(sincos_table_2d(self.cfg.embed_dim, self.cfg.grid_size))
        self.decoder_pos_embed.data.copy_(sincos_table_2d(self.cfg.decoder_dim, self.cfg.grid_size))
        conv = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
        trunc_normal_(self.ar_token, std=0.02)
        trunc_normal_(self.kd_token, std=0.02)
        nn.init.zeros_(self.cls_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)

    # ---------------------------------------------------------------- forward, in named steps

    def ordered_indices(self, order: Tensor) -> tuple[Tensor, Tensor]:
        """Raster indices of student (B, S, T) and teacher (B, S, Tt) tokens, segments in each sample's order."""
        return self.student_segments[order], self.teacher_segments[order]

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks, each sharded as one unit (FSDP): encoder, then both decoders."""
        return [*self.blocks, *self.kd_blocks, *self.ar_blocks]

    def forward_encoder(self, images: Tensor, student_index: Tensor) -> list[Tensor]:
        """Encode the first S-1 segments (in order) plus a trailing CLS; return the tapped block outputs.

        images: (B, C, H, W); student_index: (B, S, T). Returns len(feature_taps) tensors (B, L, D).
        """
        B = images.shape[0]
        visible = student_index[:, :-1].reshape(B, -1)  # (B, (S-1) T)
        x = self.embed_patches(images, visible)  # (B, (S-1) T, D)
        x = x + self.pos_embed[0, 1:][visible]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([x, cls], dim=1)  # (B, L, D)

        return self.block_runner(list(self.blocks), x, (self.attention_mask(),), self.cfg.feature_taps)

    def embed_patches(self, images: Tensor, index: Tensor) -> Tensor:
        """``patch_embed`` of the patches at ``index`` (B, L) only, (B, L, D): the patches' pixels are gathered and
        multiplied by the convolution's weight, the convolution's sums in another order. Gathering pixels, which
        need no gradient, instead of the embeddings leaves the backward pass no scatter: torch_xla lowers a
        gather's backward to a scatter into the flattened global batch, which the SPMD partitioner cannot split
        by batch (ViT-H/14 at 56 per v5e chip: a bf16[896,256,1280] buffer on every chip, all-reduced)."""
        proj = cast(nn.Conv2d, self.patch_embed.proj)
        patches = select_rows(conv_patches(images, self.cfg.patch_size), index)
        return F.linear(patches, proj.weight.flatten(1), proj.bias)

    def project_latents(self, features: list[Tensor], norms: nn.ModuleList, proj: nn.Linear) -> Tensor:
        """Norm each tap, concat on channels, project: (B, L, decoder_dim, decoder_depth), channels interleaved."""
        x = proj(torch.cat([norm(f) for norm, f in zip(norms, features, strict=True)], dim=-1))
        return x.reshape(x.shape[0], x.shape[1], self.cfg.decoder_dim, self.cfg.decoder_depth)

    def decoder_queries(self, token: Tensor, student_index: Tensor, segments: slice) -> Tensor:
        """Learned token + decoder position of the chosen segments, then the CLS query: (B, L, decoder_dim)."""
        B = student_index.shape[0]
        idx = student_index[:, segments].reshape(B, -1)
        queries = token + self.decoder_pos_embed[0, 1:][idx]
        cls = (token + self.decoder_pos_embed[:, :1]).expand(B, -1, -1)
        return torch.cat([queries, cls], dim=1)

    def forward_decoder(self, queries: Tensor, latent: Tensor, blocks: nn.ModuleList, norm, pred) -> Tensor:
        """Run one decoder; block d cross-attends to latent[..., d]. Returns (B, L, teacher_dim)."""
        # Through the block runner, each block with its own latent (a row of ``per_block``): a backend that
        # rematerialises or scans the encoder's blocks does the same to these. Their 32-head attention over the
        # whole sequence keeps more per image than an encoder block of ViT-B or ViT-L; scanned, the AR and KD
        # decoders are two loops with one body, which libtpu lowers once.
        (x,) = self.block_runner(list(blocks), queries, (self.attention_mask(),), (), (latent.movedim(-1, 0),))
        return pred(norm(x))

    def select_targets(self, teacher_tokens: Tensor, teacher_index: Tensor, segments: slice) -> Tensor:
        """Teacher tokens of the chosen segments (in order), then teacher CLS: (B, (S-1) Tt + 1, Dt)."""
        B, _, Dt = teacher_tokens.shape
        idx = teacher_index[:, segments].reshape(B, -1)
        patches = torch.gather(teacher_tokens[:, 1:], 1, idx[..., None].expand(-1, -1, Dt))
        return torch.cat([patches, teacher_tokens[:, :1]], dim=1)

    def forward_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean 2 - 2 cos over tokens; segment predictions are resized bilinearly to the teacher's segment grid."""
        cfg = self.cfg
        B, _, Dt = pred.shape
        side = cfg.grid_size // cfg.segments_per_side
        t_side = cfg.teacher_grid // cfg.segments_per_side
        patches = pred[:, :-1]
        if side != t_side:
            n = cfg.num_segments - 1
            grid = patches.reshape(B * n, side * side, Dt)
            patches = torch.matmul(self.segment_resize.to(grid.dtype), grid).reshape(B, n * t_side * t_side, Dt)
        return cosine_distance(torch.cat([patches, pred[:, -1:]], dim=1), target).mean()

    def forward(self, images: Tensor, teacher_tokens: Tensor, order: Tensor | None = None) -> DiGPTOutput:
        """images: (B, 3, H, W) normalised; teacher_tokens: (B, 1 + Ht*Wt, Dt), CLS first; order: (B, S)."""
        cfg = self.cfg
        expected = (images.shape[0], 1 + cfg.teacher_grid**2, cfg.teacher_dim)
        if tuple(teacher_tokens.shape) != expected:
            raise ValueError(f"teacher_tokens has shape {tuple(teacher_tokens.shape)}, the model expects {expected}")
        if order is None:
            order = random_segment_order(images.shape[0], cfg.num_segments, images.device)
        student_index, teacher_index = self.ordered_indices(order)
        features = self.forward_encoder(images, student_index)
        ar_latent = self.project_latents(features, self.ar_enc_norm, self.ar_enc2dec)
        kd_latent = self.project_latents(features, self.kd_enc_norm, self.kd_enc2dec)

        next_segments, visible_segments = slice(1, None), slice(None, -1)
        # Crossed on purpose, as in the release: the AR decoder reads the KD branch's latent and vice versa.
        ar_pred = self.forward_decoder(
            self.decoder_queries(self.ar_token, student_index, next_segments),
            kd_latent,
            self.ar_blocks,
            self.ar_norm,
            self.ar_pred,
        )
        kd_pred = self.forward_decoder(
            self.decoder_queries(self.kd_token, student_index, visible_segments),
            ar_latent,
            self.kd_blocks,
            self.kd_norm,
            self.kd_pred,
        )
        ar_loss = self.forward_loss(ar_pred, self.select_targets(teacher_tokens, teacher_index, next_segments))
        kd_loss = self.forward_loss(kd_pred, self.select_targets(teacher_tokens, teacher_index, visible_segments))
        return DiGPTOutput(ar_loss, kd_loss)

    @torch.no_grad()
    def forward_features(self, images: Tensor) -> Tensor:
        """Representation for probes: every patch in raster order, full attention, mean of the last block."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([x, cls], dim=1)
        no_mask = None if self.mode == "flex" else torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, no_mask)
        return x[:, :-1].mean(dim=1)

    def attention_mask(self):
        """The segment-causal mask in the form the attention mode takes: the ``mask`` buffer (sdpa, explicit) or
        its flex ``BlockMask``, built once per device and kept out of the state dict."""
        if self.mode != "flex":
            return self.mask
        device = self.mask.device
        if device not in self._block_masks:
            self._block_masks[device] = segment_causal_block_mask(
                self.cfg.num_segments - 1, self.cfg.tokens_per_segment, device
            )
        return self._block_masks[device]

    def num_trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def weight_decay_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW's parameter groups, as the release builds them (MAE's rule): ``weight_decay`` on the weights of
        two or more dimensions, none on biases and norms. Every optimizer of this model is built from these."""
        from timm.optim import param_groups_weight_decay

        return param_groups_weight_decay(self, weight_decay)
