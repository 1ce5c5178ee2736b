"""The gap study: does a backend or numeric setting change what pretraining is worth downstream?

For every side (``backend:precision``) and seed: pretrain (the demo recipe by default), probe the frozen encoder
(kNN and linear, fp32 features on the CPU, so the probe measures only the pretrained weights), then finetune on the
side's own backend and precision (so the finetune number carries the whole pipeline, as the paper's 86.2 vs 85.9
does). Each result goes to the gap ledger as soon as it exists; a rerun skips what the ledger already holds for the
same configs, so an interrupted study loses at most the run in progress. The report puts every metric's mean +- std
per side beside the baseline side with a Welch t-test, and plots the seeds.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from digpt_xla.config import Config, ConfigError, load_config, load_dataclass
from digpt_xla.engine.metrics import read_metrics
from digpt_xla.repo import find_config
from digpt_xla.rundir import RunDir

from .gap import (
    PAPER_ROWS,
    config_hash,
    read_ledger,
    render_markdown,
    seed_values,
    side_name,
    summarize,
)
from .report import environment
from .sides import parse_factor
from .study_runner import StudyRunner

log = logging.getLogger(__name__)

METRICS = ("finetune_top1", "linear_top1", "knn_top1", "pretrain_loss")
_LABELS = {
    "finetune_top1": "finetune top-1 (%)",
    "linear_top1": "linear probe top-1 (%)",
    "knn_top1": "kNN top-1 (%)",
    "pretrain_loss": "final pretraining loss",
}


@dataclass
class StudyConfig:
    pretrain_config: str = "yaml/demo.yaml"
    finetune_config: str = "yaml/finetune/tiny_digits.yaml"
    sides: list[str] = field(default_factory=lambda: ["cpu:fp32", "xla:fp32", "xla:bf16", "cpu:tpu-emulation"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: str = "cpu:fp32"
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    pretrain_overrides: list[str] = field(default_factory=list)
    finetune_overrides: list[str] = field(default_factory=list)
    out_dir: str = "parity/reports/gap_study_digits"  # ledger.jsonl, report.md, gap_study.png
    run_dir: str = "runs/gap_study_digits"  # checkpoints and logs of every run
    alpha: float = 0.05


def load_study_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    cfg = load_dataclass(StudyConfig(), find_config(path), overrides)
    for side in cfg.sides:
        parse_side(side)
    if cfg.baseline not in cfg.sides:
        raise ConfigError(f"baseline {cfg.baseline!r} is not one of the sides {cfg.sides}")
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"metrics {unknown} unknown; choose from {', '.join(METRICS)}")
    if not cfg.seeds:
        raise ConfigError("seeds is empty")
    return cfg


def parse_side(text: str) -> tuple[str, str]:
    """A study side is a factor's side alone (``backend:precision``): its runs take no other overrides."""
    factor = parse_factor(text, what="study side")
    if factor.overrides or "=" in text:
        raise ConfigError(f"study side {text!r}: backend:precision only (overrides go to pretrain_overrides)")
    return factor.backend, factor.precision


@dataclass
class _Run:
    side: str
    seed: int
    pretrain: Config
    finetune: Config


class GapStudy:
    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self.out = RunDir(cfg.out_dir)
        self.ledger = self.out.url_of("ledger.jsonl")
        base_p = load_config(find_config(cfg.pretrain_config), cfg.pretrain_overrides)
        base_f = load_config(find_config(cfg.finetune_config), cfg.finetune_overrides)
        # One hash for the pair: a ledger row counts as done only for the same pretraining and finetuning recipe.
        self.config_hash = config_hash(
            {"pretrain": {"h": config_hash(base_p.to_dict())}, "finetune": {"h": config_hash(base_f.to_dict())}}
        )
        self.runner = StudyRunner("gap study", self.ledger, self.config_hash, base_p.data.source)

    def runs(self) -> list[_Run]:
        cfg, out = self.cfg, []
        # Seed-major: a study cut short still has every side at the seeds it finished.
        for seed in cfg.seeds:
            for side in cfg.sides:
                backend, precision = parse_side(side)
                where = os.path.join(cfg.run_dir, side.replace(":", "_"), f"seed{seed}")
                common = [
                    f"backend.name={backend}",
                    f"backend.precision={precision}",
                    f"run.seed={seed}",
                    "run.resume=auto",
                    "run.knn_eval=false",
                    "run.progress=false",
                ]
                p = load_config(
                    find_config(cfg.pretrain_config),
                    [*cfg.pretrain_overrides, *common, f"run.out_dir={where}/pretrain"],
                )
                f = load_config(
                    find_config(cfg.finetune_config),
                    [*cfg.finetune_overrides, *common, f"run.out_dir={where}/finetune"],
                )
                out.append(_Run(side, seed, p, f))
        return out

    def done(self) -> set[tuple[str, int, str]]:
        if not self.out.exists("ledger.jsonl"):
            return set()
        rows = read_ledger(self.ledger)
        return {(side_name(r), int(r["seed"]), r["metric"]) for r in rows if r["config_hash"] == self.config_hash}

    def run(self) -> dict[str, Any]:
        runs, done = self.runs(), self.done()
        self.runner.start_backends([r.pretrain for r in runs])
        todo = [r for r in runs if any((r.side, r.seed, m) not in done for m in self.cfg.metrics)]

        def run_and_record(run: _Run) -> None:
            missing = {m for m in self.cfg.metrics if (run.side, run.seed, m) not in done}
            backend, precision = parse_side(run.side)
            self.runner.record(backend, precision, run.seed, dict(self.run_one(run, missing)))

        seconds = self.runner.run(todo, len(runs), lambda r: f"{r.side} seed {r.seed}", run_and_record)
        self.write_report()
        return {"runs": len(runs), "ran": len(todo), "seconds": seconds}

    def run_one(self, run: _Run, metrics: set[str]) -> list[tuple[str, float]]:
        from digpt_xla.engine import Pretrainer
        from digpt_xla.engine.finetune import Finetuner

        backend = self.runner.backend(run.pretrain)
        result = Pretrainer(run.pretrain, backend).train()
        # From the metrics file rather than the result: a pretraining resumed at its last step runs no step.
        logged = [r for r in read_metrics(run.pretrain.run.out_dir) if r.get("loss") is not None]
        out = [("pretrain_loss", logged[-1]["loss"])]
        if metrics & {"knn_top1", "linear_top1"}:
            probe_dir = os.path.join(os.path.dirname(run.pretrain.run.out_dir), "probe")
            out += list(self.runner.probe(run.pretrain, result.checkpoint, probe_dir).items())
        if "finetune_top1" in metrics:
            run.finetune.finetune.checkpoint = result.checkpoint
            out.append(("finetune_top1", Finetuner(run.finetune, backend).train()["top1"]))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in out)
        log.info("%s seed %d: %s", run.side, run.seed, shown)
        return [(k, float(v)) for k, v in out if k in metrics]

    # ------------------------------------------------------------------ report
    def write_report(self) -> None:
        rows = [r for r in read_ledger(self.ledger) if r["config_hash"] == self.config_hash]
        cfg = self.cfg
        rows = [r for r in rows if side_name(r) in cfg.sides]
        # A metric is reported once its baseline has a value (partial studies report what they have).
        metrics = [m for m in cfg.metrics if any(r["metric"] == m and side_name(r) == cfg.baseline for r in rows)]
        self.out.write_bytes("gap_study.png", plot_study(rows, metrics, cfg.sides, cfg.baseline))
        self.out.write_text("report.md", render_study(rows, metrics, cfg, self.config_hash))
        summary = {m: summarize(rows, m, cfg.baseline, cfg.alpha) for m in metrics}
        self.out.write_json(
            "study.json",
            {
                "config": dataclasses.asdict(cfg),
                "config_hash": self.config_hash,
                "environment": environment(),
                "summary": summary,
            },
        )
        log.info("report: %s", self.out.url_of("report.md"))


def render_study(rows: list[dict[str, Any]], metrics: list[str], cfg: StudyConfig, chash: str) -> str:
    env = environment()
    revisions = sorted({r["git_revision"][:10] for r in rows})
    paper = ", ".join(f"{p['setting']} {p['value']}" for p in PAPER_ROWS)
    lines = [
        "# Gap study at embedded scale",
        "",
        f"Pretraining `{cfg.pretrain_config}` then probing and finetuning `{cfg.finetune_config}` for each side "
        f"and seed ({', '.join(map(str, cfg.seeds))}). Probes use fp32 CPU features of the pretrained encoder; "
        "finetuning runs on the side's own backend and precision. Config hash "
        f"`{chash}`, git revision(s) {', '.join(revisions) or '-'}.",
        "",
        f"For scale: the paper's ImageNet-1K finetuning top-1 of ViT-B is {paper}, one run each (no seed spread "
        "published), a 0.3-point difference.",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "Reproduce: `python -m parity gap study --config yaml/parity/gap_study_digits.yaml` "
        "(skips the runs already in the ledger).",
        "",
        "![gap study](gap_study.png)",
        "",
    ]
    for metric in metrics:
        decimals = 4 if metric == "pretrain_loss" else 2
        table = render_markdown(rows, metric, cfg.baseline, cfg.alpha, decimals=decimals).splitlines()
        lines += [f"## {_LABELS[metric]}", "", *table[2:], *per_seed_table(rows, metric, cfg.sides, decimals), ""]
    return "\n".join(lines)


def per_seed_table(rows: list[dict[str, Any]], metric: str, sides: list[str], decimals: int) -> list[str]:
    """Seeds down, sides across: the pairs the paired test compares."""
    value = seed_values(rows, metric)
    seeds = sorted({seed for _, seed in value})
    header = "| seed | " + " | ".join(f"`{s}`" for s in sides) + " |"
    out = ["", "Per seed:", "", header, "|---" * (len(sides) + 1) + "|"]
    for seed in seeds:
        cells = [f"{value[(s, seed)]:.{decimals}f}" if (s, seed) in value else "-" for s in sides]
        out.append(f"| {seed} | " + " | ".join(cells) + " |")
    return out


def plot_study(rows: list[dict[str, Any]], metrics: list[str], sides: list[str], baseline: str) -> bytes:
    """Per metric: each seed's value per side with mean +- std (top), and each seed's difference from the
    baseline's value at the same seed (bottom: what the paired test sees once the seed's own effect is gone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def mean_std(ax, x: float, values: list[float]) -> None:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        ax.errorbar([x + 0.15], [float(np.mean(values))], yerr=[std], fmt="o", color="black", capsize=3, ms=4)

    fig, axes = plt.subplots(2, len(metrics), figsize=(3.6 * len(metrics), 6.4), squeeze=False)
    for col, metric in enumerate(metrics):
        top, bottom = axes[0][col], axes[1][col]
        value = seed_values(rows, metric)
        for x, side in enumerate(sides):
            seeds = sorted(seed for s, seed in value if s == side)
            if not seeds:
                continue
            values = [value[(side, seed)] for seed in seeds]
            top.scatter([x] * len(values), values, s=14, alpha=0.6, color=f"C{x}")
            mean_std(top, x, values)
            diffs = [value[(side, seed)] - value[(baseline, seed)] for seed in seeds if (baseline, seed) in value]
            if side != baseline and diffs:
                bottom.scatter([x] * len(diffs), diffs, s=14, alpha=0.6, color=f"C{x}")
                mean_std(bottom, x, diffs)
        bottom.axhline(0.0, color="grey", lw=0.8, ls="--")
        for ax in (top, bottom):
            ax.set_xticks(range(len(sides)))
            ax.set_xticklabels(sides, rotation=30, ha="right", fontsize=8)
        top.set_title(_LABELS[metric], fontsize=9)
        bottom.set_title(f"minus {baseline} at the same seed", fontsize=8)
    fig.suptitle("digpt_tiny on digits: seeds (dots), mean +- std (black)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
