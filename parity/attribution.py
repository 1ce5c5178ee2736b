"""Gap attribution: which factor moves training systematically, measured against the noise of a one-ulp change.

Every perturbation, even one ulp in one initial weight, eventually moves a training run as far as a new seed
does. So a factor is judged by the *paired* difference it makes at each seed (same initial weights, same data,
same steps as the baseline), tested against the paired differences of the one-ulp control at the same seeds:
chaos alone is then not a finding. A factor is one change to the baseline: a side (``cpu:tpu-emulation``,
``xla:fp32``, ``cpu:fp32 teacher=bf16``) and/or config overrides (``optim.eps=1e-6``, ``model.attention=explicit``,
``backend.name=xla-spmd backend.fsdp=4``), so a factor nobody thought of needs no code. The controls always run:
``one-ulp`` (every element of one initial weight tensor one ulp up), ``data order`` (another data seed),
``init`` (another initialisation seed).

Per side and seed the trainer's own step runs N steps; recorded: the loss at every step, the parameters at a few
steps (their distance from the baseline's, relative to how far the baseline moved), the final loss (mean of the
last window) and, optionally, the probes (kNN and linear, fp32 features). Results go to ``results.jsonl`` as each
run ends (and to the gap ledger); a rerun skips what is there.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import math
import os
import statistics
import time
from typing import Any

import torch

from digpt_xla.config import Config, ConfigError, load_config, load_dataclass
from digpt_xla.errors import UserError
from digpt_xla.repo import find_config
from digpt_xla.rundir import RunDir

from .attribution_report import CONTROLS, METRICS, build_report, write_report
from .config import AttributionConfig
from .gap import config_hash
from .sides import Factor, parse_factor
from .study_runner import StudyRunner

log = logging.getLogger(__name__)

OTHER_SEED = 10_000  # the controls' other data / init seed is seed + this


def load_attribution_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> AttributionConfig:
    cfg = load_dataclass(AttributionConfig(), find_config(path), overrides)
    if cfg.steps < 1 or cfg.window < 1 or cfg.record_every < 1 or not cfg.seeds:
        raise ConfigError(
            f"steps={cfg.steps}, window={cfg.window}, record_every={cfg.record_every} must be >= 1 and seeds non-empty"
        )
    if len(set(cfg.seeds)) != len(cfg.seeds):  # one run counted as several paired samples would fake certainty
        raise ConfigError(f"seeds={cfg.seeds}: each seed once (a repeated seed repeats the same runs)")
    if not 0 < cfg.alpha < 1:
        raise ConfigError(f"alpha={cfg.alpha}: a significance level between 0 and 1 (0.05 is usual)")
    if len(set(cfg.factors)) != len(cfg.factors) or set(cfg.factors) & set(CONTROLS):
        raise ConfigError(f"factors must be distinct and not named like a control ({', '.join(CONTROLS)})")
    study = Attribution(cfg)
    for side in study.sides():  # every factor's config loads now: a bad key or value fails before any run
        study.run_config(side, cfg.seeds[0])
    return cfg


class StudyInterrupted(UserError, RuntimeError):
    """A signal stopped a run of the study midway."""


class Attribution:
    def __init__(self, cfg: AttributionConfig) -> None:
        self.cfg = cfg
        self.baseline = parse_factor(cfg.baseline)
        self.factors = [parse_factor(f, self.baseline) for f in cfg.factors]
        self.out = RunDir(cfg.out_dir)
        self.results_url = self.out.url_of("results.jsonl")
        self.ledger = cfg.ledger or self.out.url_of("ledger.jsonl")
        self.scratch = RunDir(cfg.run_dir)  # the runs, and each seed's baseline parameters
        base = load_config(find_config(cfg.pretrain_config), cfg.overrides)
        self.hash = config_hash(
            {"base": base.to_dict(), "steps": cfg.steps, "window": cfg.window, "every": cfg.record_every}
        )
        self.runner = StudyRunner("attribution", self.ledger, self.hash, "attribution")

    def sides(self) -> list[Factor]:
        return [
            self.baseline,
            *self.factors,
            *(Factor(c, self.baseline.backend, self.baseline.precision, self.baseline.overrides) for c in CONTROLS),
        ]

    def run_config(self, side: Factor, seed: int) -> Config:
        init_seed = seed + OTHER_SEED if side.name == "init" else seed
        data_seed = seed + OTHER_SEED if side.name == "data order" else seed
        where = os.path.join(self.cfg.run_dir, f"seed{seed}", _slug(side.name))
        common = [
            f"backend.name={side.backend}",
            f"backend.precision={side.precision}",
            f"run.seed={init_seed}",
            f"run.data_seed={data_seed}",
            f"schedule.max_steps={self.cfg.steps}",
            "run.log_every=1",
            "run.ckpt_every=0",
            "run.keep_last=1",
            "run.resume=never",
            "run.knn_eval=false",
            "run.progress=false",
            f"run.out_dir={where}",
        ]
        try:
            return load_config(find_config(self.cfg.pretrain_config), [*self.cfg.overrides, *common, *side.overrides])
        except ConfigError as e:
            raise ConfigError(f"factor {side.name!r}: {e}") from None

    # ------------------------------------------------------------------ running
    def done(self) -> dict[tuple[str, int], dict[str, Any]]:
        if not self.out.exists("results.jsonl"):
            return {}
        rows = [json.loads(line) for line in self.out.read_text("results.jsonl").splitlines() if line.strip()]
        return {(r["side"], r["seed"]): r for r in rows if r["config_hash"] == self.hash}

    def run(self) -> dict[str, Any]:
        self.runner.start_backends([self.run_config(side, self.cfg.seeds[0]) for side in self.sides()])
        done = self.done()
        todo = [(s, seed) for seed in self.cfg.seeds for s in self.sides() if (s.name, seed) not in done]
        baselines: dict[int, dict[int, torch.Tensor]] = {}

        def run_and_record(run: tuple[Factor, int]) -> None:
            side, seed = run
            if seed not in baselines:  # runs come seed by seed: only the current seed's baseline is kept
                baselines.clear()
                baselines[seed] = self.baseline_snapshots(seed)
            row = self.run_one(side, seed, baselines[seed])
            before = self.out.read_text("results.jsonl") if self.out.exists("results.jsonl") else ""
            self.out.write_text("results.jsonl", before + json.dumps(row) + "\n")  # object stores cannot append
            done[(side.name, seed)] = row
            setting = side.precision + "".join(f" {o}" for o in side.overrides)
            metrics = {metric: row[metric] for metric in METRICS if metric in row}
            self.runner.record(side.backend, f"{setting} [{side.name}]", seed, metrics)
            log.info("%s seed %d: final loss %.5f", side.name, seed, row["final_loss"])

        total = len(self.sides()) * len(self.cfg.seeds)
        self.runner.run(todo, total, lambda r: f"{r[0].name}, seed {r[1]}", run_and_record)
        report = build_report(self.cfg, self.baseline, self.factors, list(done.values()))
        write_report(self.out, report)
        return report

    def baseline_snapshots(self, seed: int) -> dict[int, torch.Tensor]:
        """The baseline's parameters at the recorded steps of ``seed``. Empty when the baseline has not run: it is
        the seed's first run and fills the dict. Run again (its result row kept) when its file is gone."""
        if (self.baseline.name, seed) not in self.done():
            return {}
        name = _baseline_file(seed)
        if not self.scratch.exists(name):
            log.info(
                "seed %d: the baseline's parameters are not in %s; running it again", seed, self.scratch.url_of(name)
            )
            snapshots: dict[int, torch.Tensor] = {}
            self.run_one(self.baseline, seed, snapshots)
            return snapshots
        return torch.load(io.BytesIO(self.scratch.read_bytes(name)), weights_only=True)

    def run_one(self, side: Factor, seed: int, baseline: dict[int, torch.Tensor]) -> dict[str, Any]:
        cfg = self.run_config(side, seed)
        t0 = time.perf_counter()
        every = range(self.cfg.record_every, self.cfg.steps + 1, self.cfg.record_every)
        # Steps 1 and 2: the first update (the warmup's first step has lr 0 and moves nothing).
        record_at = sorted({1, min(2, self.cfg.steps), self.cfg.steps, *every})
        trainer = _recording_pretrainer(cfg, self.runner.backend(cfg), record_at, nudge=side.name == "one-ulp")
        result = trainer.train()
        checkpoint, snapshots, trainer_losses = result.checkpoint, trainer.snapshots, trainer.step_losses
        plan = trainer.resolved_plan()  # what the side ran, every auto resolved
        if result.stopped == "preempted":  # SIGINT or SIGTERM: this run is not whole, and is not recorded
            raise StudyInterrupted(
                f"the study was interrupted in seed {seed}, side {side.name!r}, at step {result.step} of "
                f"{self.cfg.steps}; the runs before it are kept in {self.results_url}: run the same command to go on"
            )
        del trainer
        gc.collect()  # a ViT-B side's model, optimizer and teacher (5 GB) go before the next side builds its own
        if side is self.baseline or side.name == self.baseline.name:
            baseline.clear()
            baseline.update(snapshots)
            buffer = io.BytesIO()
            torch.save(snapshots, buffer)
            self.scratch.write_bytes(_baseline_file(seed), buffer.getvalue())
        # Every step's own loss, whatever run.log_every logs: a factor that changes only the logging trains the
        # same weights and must show the same losses.
        losses = [float(t) for t in trainer_losses]
        start = baseline.get(0, snapshots[0])
        divergence, moved_by = {}, {}
        for step in record_at:
            if step not in baseline:
                raise RuntimeError(f"the baseline of seed {seed} has no parameters at step {step}; rerun it")
            moved = float((baseline[step].double() - start.double()).norm())
            apart = float((snapshots[step].double() - baseline[step].double()).norm())
            moved_by[str(step)] = moved
            divergence[str(step)] = apart / moved if moved > 0 else (0.0 if apart == 0 else math.inf)
        row: dict[str, Any] = {
            "side": side.name,
            "seed": seed,
            "config_hash": self.hash,
            "losses": losses,
            "final_loss": statistics.fmean(losses[-self.cfg.window :]),
            "divergence": divergence,
            "divergence_moved": moved_by,  # how far the baseline had moved: the divergence's denominator
            "identical": bool(baseline) and all(torch.equal(snapshots[s], baseline[s]) for s in record_at),
            "plan": plan,
        }
        if self.cfg.probe and checkpoint:
            row |= self.runner.probe(cfg, checkpoint)
        row["seconds"] = time.perf_counter() - t0
        return row


def _recording_pretrainer(cfg: Config, backend: Any, record_at: list[int], nudge: bool):
    from digpt_xla.engine import Pretrainer

    class RecordingPretrainer(Pretrainer):
        """The trainer's own loop, keeping a CPU copy of the trainable parameters at the recorded steps and every
        step's loss (a detached scalar on the device: read once the run is over, so no step waits for the host)."""

        snapshots: dict[int, torch.Tensor]
        step_losses: list[torch.Tensor]

        def train_step(self, *inputs: Any) -> None:
            super().train_step(*inputs)
            self.step_losses.append(self.meter.last["loss"])

        def flat_parameters(self) -> torch.Tensor:
            # fp32, the master weights' own dtype (exact; distances are taken in fp64): a ViT-B snapshot is 0.67 GB,
            # and a side holds one per recorded step beside the baseline's.
            state = self.backend.model_state_cpu(self.model)
            names = [n for n, p in self.backend.unwrap(self.model).named_parameters() if p.requires_grad]
            return torch.cat([state[n].detach().float().flatten() for n in names])

        def before_training(self) -> None:
            if nudge:
                # One ulp up in every element of the first trainable weight matrix (the patch embedding; not a
                # zero-initialised token, whose ulp is a denormal): the smallest change of one
                # weight tensor. A single element's ulp can round away under weight decay before it reaches a
                # gradient, and the control would then measure nothing.
                named = self.backend.unwrap(self.model).named_parameters()
                weight = next(p for n, p in named if p.requires_grad and p.ndim > 1 and n.endswith("weight"))
                with torch.no_grad():
                    weight.copy_(torch.nextafter(weight, torch.full_like(weight, math.inf)))
            self.snapshots = {0: self.flat_parameters()}
            self.step_losses = []
            super().before_training()

        def after_step(self) -> None:
            if self.step in record_at:
                self.snapshots[self.step] = self.flat_parameters()
            super().after_step()

    return RecordingPretrainer(cfg, backend)


def _baseline_file(seed: int) -> str:
    return f"seed{seed}/baseline_params.pt"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
