"""``digpt pretrain|demo|probe|finetune``: command-line entry points."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .backend import BackendError, xla_available
from .config import Config, ConfigError, load_config

log = logging.getLogger("digpt")
REPO_ROOT = Path(__file__).resolve().parent.parent


def find_config(path: str) -> Path:
    """A config path as given, or relative to the repository (so ``digpt demo`` works from any directory)."""
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.is_file() else candidate


def run_pretrain(cfg: Config):
    from .engine import Pretrainer

    return Pretrainer(cfg).train()


def plot_losses(run_dir: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .engine.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "ar_loss", "kd_loss"):
        ax.plot([r["step"] for r in records], [r[key] for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("2 - 2 cos")
    ax.set_title("D-iGPT tiny on digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(find_config(args.config), args.overrides)
    result = run_pretrain(cfg)
    log.info("stopped (%s) at step %d; checkpoint %s", result.stopped, result.step, result.checkpoint)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if not any(o.startswith("backend.name=") for o in overrides) and not xla_available():
        print("torch_xla is not available here: running the demo on the eager CPU backend instead.")
        overrides.append("backend.name=cpu")
    cfg = load_config(find_config(args.config), overrides)
    if cfg.backend.name.startswith("xla"):
        os.environ.setdefault("PJRT_DEVICE", "CPU")
    result = run_pretrain(cfg)
    png = os.path.join(cfg.run.out_dir, "loss_curve.png")
    plot_losses(cfg.run.out_dir, png)
    knn = result.knn
    print(
        f"\nD-iGPT demo ({cfg.model.name} on digits, backend {cfg.backend.name}, {result.step} steps)\n"
        f"  final loss       {result.last_metrics.get('loss', float('nan')):.4f} "
        f"(ar {result.last_metrics.get('ar_loss', float('nan')):.4f}, "
        f"kd {result.last_metrics.get('kd_loss', float('nan')):.4f})\n"
        f"  kNN top-1        {knn.get('knn_top1_init', float('nan')):.1f}% at initialisation -> "
        f"{knn.get('knn_top1', float('nan')):.1f}% pretrained\n"
        f"  run directory    {cfg.run.out_dir} (checkpoint, metrics.jsonl, tb/, loss_curve.png)"
    )
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .engine.probe_run import run_probe

    cfg = load_config(find_config(args.config), args.overrides)
    result = run_probe(cfg)
    shown = ", ".join(f"{k} {result[k]:.1f}%" for k in ("knn_top1", "linear_top1") if k in result)
    print(f"probe of {result['checkpoint']} ({result['train_samples']} train / {result['val_samples']} held out): "
          f"{shown} -> {os.path.join(cfg.run.out_dir, 'probe.json')}")  # fmt: skip
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .engine.finetune import Finetuner

    cfg = load_config(find_config(args.config), args.overrides)
    result = Finetuner(cfg).train()
    scores = f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {result['eval_samples']} held-out samples"
    print(f"finetuned {cfg.model.name} for {result['step']} steps: {scores} -> {cfg.run.out_dir}/finetune.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digpt", description="D-iGPT pretraining on CPU, CUDA and XLA")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain a D-iGPT model (one process, or one per rank under torchrun)")
    p.add_argument("--config", required=True, help="YAML file, e.g. yaml/pretrain/vit_base_gpu.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.batch_size=32")
    p.set_defaults(fn=cmd_pretrain)
    d = sub.add_parser("demo", help="pretrain digpt_tiny on the embedded digits, then report kNN accuracy")
    d.add_argument("--config", default="yaml/demo.yaml")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(fn=cmd_demo)
    pr = sub.add_parser("probe", help="kNN and linear probe of a pretrained encoder's frozen features")
    pr.add_argument("--config", default="yaml/demo.yaml")
    pr.add_argument("overrides", nargs="*", help="e.g. probe.checkpoint=runs/demo/checkpoints/ckpt-00000198.pt")
    pr.set_defaults(fn=cmd_probe)
    ft = sub.add_parser("finetune", help="finetune a classifier from a pretrained encoder (timm ViT)")
    ft.add_argument("--config", default="yaml/finetune/tiny_digits.yaml")
    ft.add_argument("overrides", nargs="*", help="e.g. finetune.checkpoint=runs/demo/checkpoints/ckpt-00000198.pt")
    ft.set_defaults(fn=cmd_finetune)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, errors: tuple[type[Exception], ...]) -> int:
    """Parse, run the chosen subcommand; expected input errors print one line and exit 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except errors as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .teacher import CheckpointError

    return run_command(build_parser(), argv, (ConfigError, BackendError, DataError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
