"""What the two studies share: the gap study (``python -m parity gap-study``: pretrain, probe and finetune per side)
and gap attribution (``python -m parity attribute``: paired differences against a one-ulp control) are two reports
over one runner. It holds the study's backends (one per kind and layout, started before any run), writes every
result to the gap ledger as it exists, runs what the ledger or the results file does not already hold, in order,
and says how long the rest will take."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from digpt_xla.backend import Backend
from digpt_xla.config import Config
from digpt_xla.repo import git_revision

from .gap import GapResult, append_result
from .sides import shared_backend

log = logging.getLogger(__name__)

Run = TypeVar("Run")


class StudyRunner:
    """``ledger``: the gap ledger's URL; ``config_hash``: what a ledger row of this study is matched by; ``data``: the
    ledger's data label (the dataset, or "attribution")."""

    def __init__(self, name: str, ledger: str, config_hash: str, data: str) -> None:
        self.name, self.ledger, self.config_hash, self.data = name, ledger, config_hash, data
        self.revision = git_revision()

    @staticmethod
    def backend(cfg: Config) -> Backend:
        """The run's backend: one object per (kind, fsdp) for the whole process (an XLA runtime starts once)."""
        return shared_backend(cfg.backend.name, cfg.backend.fsdp, cfg.backend.compile_cache)

    def start_backends(self, configs: Sequence[Config]) -> None:
        """Every backend the study will use, before any backward: autograd sizes its per-device queues at its
        first one, so a backend started later would find them too small."""
        for cfg in configs:
            self.backend(cfg)

    def probe(self, cfg: Config, checkpoint: str, out_dir: str | None = None) -> dict[str, float]:
        """kNN and linear-probe top-1 of ``checkpoint``'s encoder, from fp32 features on the CPU whatever the run's
        backend and precision, so that a probe measures the pretrained weights alone; written to ``out_dir``
        (default: the run's own directory)."""
        from digpt_xla.engine.probe_run import run_probe

        probe_cfg = copy.deepcopy(cfg)
        probe_cfg.backend.name, probe_cfg.backend.precision = "cpu", "fp32"
        probe_cfg.probe.checkpoint = checkpoint
        if out_dir is not None:
            probe_cfg.run.out_dir = out_dir
        result = run_probe(probe_cfg, self.backend(probe_cfg))
        return {k: result[k] for k in ("knn_top1", "linear_top1") if k in result}

    def record(self, backend: str, setting: str, seed: int, metrics: dict[str, float]) -> None:
        """One ledger row per metric, written now: an interrupted study keeps every result it has."""
        for metric, value in metrics.items():
            row = GapResult(backend, setting, seed, self.config_hash, self.revision, self.data, metric, value)
            append_result(self.ledger, row)

    def run(self, runs: list[Run], total: int, label: Callable[[Run], str], run_one: Callable[[Run], Any]) -> dict:
        """``run_one`` over the ``runs`` still to do (of ``total``), in order, with progress and the time left;
        returns each run's seconds by its label."""
        log.info("%s: %d runs, %d done, %d to do", self.name, total, total - len(runs), len(runs))
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        for i, run in enumerate(runs, start=1):
            name = label(run)
            log.info("[%d/%d] %s", i, len(runs), name)
            t0 = time.perf_counter()
            run_one(run)
            seconds[name] = time.perf_counter() - t0
            left = (time.perf_counter() - started) / i * (len(runs) - i)
            log.info("%s took %.0f s; about %.0f min left", name, seconds[name], left / 60)
        return seconds
