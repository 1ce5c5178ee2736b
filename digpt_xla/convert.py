"""Convert a D-iGPT pretraining checkpoint (ours, single-file or sharded, or the published release) into a timm
classifier state dict, or consolidate it into the release's single state dict.

    python tools/convert_checkpoint.py runs/vit_base/checkpoints/ckpt-00100000.pt vit_b_digpt.safetensors \\
        --num-classes 1000
    python tools/convert_checkpoint.py gs://bucket/runs/vit_huge_tpu/checkpoints/ckpt-00100000 vit_h_digpt.pth \\
        --format release

``--format release`` writes the pretraining model's state dict under the release's keys (loads with
``strict=True`` into the release's model and ours); a sharded checkpoint directory is gathered into it.

The result loads with ``strict=True`` into
``timm.create_model("vit_base_patch16_224", global_pool="avg", fc_norm=True, num_classes=1000)``: the encoder
is kept as is, fc_norm starts as the identity LayerNorm and the head from a truncated normal (std 2e-5). The
decoders, their projections and norms, the query tokens and the mask are dropped and listed.
"""

from __future__ import annotations

import argparse
from collections import Counter

import fsspec
import torch

from .checkpoint.reader import CheckpointError, read_weights
from .config import ModelConfig
from .entry import run_entry
from .models import digpt_config
from .models.classifier import classifier_state, encoder_config_from_state

TIMM_NAMES = {
    (768, 12, 16): "vit_base_patch16_224",
    (384, 12, 16): "vit_small_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (1280, 32, 14): "vit_huge_patch14_224",
}


def write_state_dict(state: dict[str, torch.Tensor], out: str) -> None:
    if out.endswith(".safetensors"):
        from safetensors.torch import save

        # clone: tensors that share storage (a LayerNorm listed once per tap) are stored once each
        payload = save({k: v.contiguous().clone() for k, v in state.items()})
        with fsspec.open(out, "wb") as f:
            f.write(payload)
    else:
        with fsspec.open(out, "wb") as f:
            torch.save(state, f)


def model_config_from_dict(saved: dict):
    """The full model shape of a checkpoint's saved ``model`` config section (a size name plus overrides)."""
    fields = {k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__}
    try:
        model = ModelConfig(**fields)
        return digpt_config(model.name, **model.shape_overrides())
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's model config cannot be read ({e})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint",
        help="pretraining checkpoint (.pt/.pth/.safetensors, or a sharded checkpoint directory), local or fsspec URL",
    )
    parser.add_argument("out", help="output state dict: .safetensors or .pth, local or fsspec URL")
    parser.add_argument("--format", choices=("timm", "release"), default="timm")
    parser.add_argument("--num-classes", type=int, help="classes of the timm head (--format timm)")
    args = parser.parse_args(argv)
    if args.format == "timm" and (args.num_classes is None or args.num_classes < 1):
        parser.error(f"--format timm needs --num-classes >= 1, got {args.num_classes}")
    return run_entry("convert_checkpoint.py", lambda: _convert(args), (OSError,))


def _convert(args: argparse.Namespace) -> int:
    state, saved = read_weights(args.checkpoint)
    if args.format == "timm":
        converted, dropped = classifier_state(state, args.num_classes, source=args.checkpoint)
        cfg = encoder_config_from_state(state)
        # The head count is not in the weights' shapes: ours carry it in their config; the release's is B/L/H.
        heads = model_config_from_dict(saved).num_heads if saved else cfg.num_heads
    if args.format == "release":
        write_state_dict(state, args.out)
        print(f"wrote {len(state)} tensors under the release's keys to {args.out}")
        return 0
    write_state_dict(converted, args.out)
    groups = Counter(k.split(".")[0] for k in dropped)
    print(f"kept {len(converted) - 4} encoder tensors, added fc_norm + head ({args.num_classes} classes)")
    print("dropped: " + ", ".join(f"{name} ({n})" for name, n in sorted(groups.items())))
    name = TIMM_NAMES.get((cfg.embed_dim, cfg.depth, cfg.patch_size))
    if name:
        print(f'load: timm.create_model("{name}", global_pool="avg", fc_norm=True, num_classes={args.num_classes})')
    else:  # no registered timm name for this shape: the VisionTransformer arguments themselves
        guessed = "" if saved else f"  # num_heads guessed as {heads}: the checkpoint has no config"
        print(
            f"load: timm.models.vision_transformer.VisionTransformer(img_size={cfg.img_size}, "
            f"patch_size={cfg.patch_size}, embed_dim={cfg.embed_dim}, depth={cfg.depth}, num_heads={heads}, "
            f"mlp_ratio={cfg.mlp_ratio:g}, global_pool='avg', fc_norm=True, num_classes={args.num_classes}){guessed}"
        )
    print(f"wrote {args.out}")
    return 0
