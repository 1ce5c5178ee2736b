"""``digpt pretrain|demo|probe|finetune``: command-line entry points."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import Config, load_config
from .entry import run_entry
from .repo import find_config

log = logging.getLogger("digpt")


def run_pretrain(cfg: Config):
    from .engine import Pretrainer

    return _exiting_after(Pretrainer(cfg).train())


def _exiting_after(result):
    """The command ends with this run: after a stop on a signal, further ones are ignored while it exits."""
    from .engine.signals import ignore_stop_signals

    stopped = result.stopped if hasattr(result, "stopped") else result.get("stopped")
    if stopped == "preempted":
        ignore_stop_signals()
    return result


def plot_losses(run_dir: str, title: str) -> str:
    """``loss_curve.png`` of a run's logged losses, written into the run directory (any fsspec URL)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .engine.metrics import read_metrics
    from .rundir import RunDir

    records = [r for r in read_metrics(run_dir) if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "ar_loss", "kd_loss"):
        ax.plot([r["step"] for r in records], [r[key] for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("2 - 2 cos")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return RunDir(run_dir).write_bytes("loss_curve.png", buffer.getvalue())


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(find_config(args.config), args.overrides)
    result = run_pretrain(cfg)
    log.info("stopped (%s) at step %d; checkpoint %s", result.stopped, result.step, result.checkpoint)
    for key, value in result.knn.items():
        print(f"{key}: {value:.2f}%")
    if os.environ.get("RANK", "0") == "0":  # one writer under torchrun (every rank runs this command)
        png = plot_losses(cfg.run.out_dir, f"D-iGPT {cfg.model.name} on {cfg.data.source}")
        print(f"loss curve: {png}; live metrics: tensorboard --logdir {cfg.run.out_dir}/tb")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .backend import xla_available

    overrides = list(args.overrides)
    if not any(o.startswith("backend.name=") for o in overrides) and not xla_available():
        print("torch_xla is not available here: running the demo on the eager CPU backend instead.")
        overrides.append("backend.name=cpu")
    cfg = load_config(find_config(args.config), overrides)
    if cfg.backend.name.startswith("xla"):
        os.environ.setdefault("PJRT_DEVICE", "CPU")
    result = run_pretrain(cfg)
    png = plot_losses(cfg.run.out_dir, f"D-iGPT {cfg.model.name} on {cfg.data.source}")
    from .engine.metrics import read_metrics

    logged = [r for r in read_metrics(cfg.run.out_dir) if r.get("loss") is not None]
    first = logged[0] if logged else {"step": 0, "loss": float("nan")}
    last, knn, nan = result.last_metrics, result.knn, float("nan")
    print(
        f"\nD-iGPT demo ({cfg.model.name} on digits, backend {cfg.backend.name}, {result.step} steps)\n"
        f"  loss             {first['loss']:.4f} (mean of steps 1-{first['step']}) -> {last.get('loss', nan):.4f} "
        f"(mean of the last {cfg.run.log_every} steps; ar {last.get('ar_loss', nan):.4f}, "
        f"kd {last.get('kd_loss', nan):.4f})\n"
        f"  kNN top-1        {knn.get('knn_top1_init', nan):.1f}% at initialisation -> "
        f"{knn.get('knn_top1', nan):.1f}% pretrained\n"
        f"  run directory    {cfg.run.out_dir} (checkpoints/, metrics.jsonl, tb/, {png.rsplit('/', 1)[-1]})"
    )
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .engine.probe_run import run_probe

    cfg = load_config(find_config(args.config), args.overrides)
    result = run_probe(cfg)
    shown = ", ".join(f"{k} {result[k]:.1f}%" for k in ("knn_top1", "linear_top1") if k in result)
    print(
        f"probe of {result['checkpoint']} ({result['train_samples']} train / {result['val_samples']} held out): "
        f"{shown} -> {os.path.join(cfg.run.out_dir, 'probe.json')}"
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .engine.finetune import Finetuner

    cfg = load_config(find_config(args.config), args.overrides)
    result = _exiting_after(Finetuner(cfg).train())
    if "top1" not in result:
        print(f"finetuning stopped ({result['stopped']}) at step {result['step']}; checkpoint {result['checkpoint']}")
        return 0
    scores = (
        f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {result['eval_samples']} held-out samples"
        f" (best top-1 {result['best_top1']:.2f}% at epoch {result['best_epoch']:.2f})"
    )
    if "ema_top1" in result:
        scores += f", EMA top-1 {result['ema_top1']:.2f}%"
    print(
        f"finetuned {cfg.model.name} for {result['step']} steps ({result['stopped']}): {scores} "
        f"-> {cfg.run.out_dir}/finetune.json"
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config_keys import render

    print(render(load_config(find_config(args.config) if args.config else None, args.overrides)))
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
    c = sub.add_parser("config", help="print the resolved config, every key with its value and what it means")
    c.add_argument("--config", default="", help="YAML file (none: the defaults)")
    c.add_argument("overrides", nargs="*", help="section.key=value overrides, applied as a run would")
    c.set_defaults(fn=cmd_config)
    return parser


def run_command(
    parser: argparse.ArgumentParser, argv: list[str] | None, more_user_errors: tuple[type[Exception], ...] = ()
) -> int:
    """Parse, then run the chosen subcommand through the one entry wrapper (``digpt_xla.entry``)."""
    args = parser.parse_args(argv)
    return run_entry(parser.prog, lambda: args.fn(args), more_user_errors)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
