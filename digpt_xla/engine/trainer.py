"""What every trainer shares: batch arithmetic, the optimizer step and the loop.

``Pretrainer`` and ``Finetuner`` subclass ``Trainer`` and supply the model, the data and ``train_step``; the loop
(logging, SIGTERM, non-finite stop, checkpoint cadence, progress) lives here once, and ``run_step`` is the one step
every driver runs. How a checkpoint is written and the one resume path are ``digpt_xla.checkpoint.training_state``;
what it holds comes from stateful parts, each with ``state_dict`` / ``load_state_dict``: the trainer (step, and a
subclass's EMA weights, Mixup's generator, evaluation history), the optimizer step (its loss scaler), the training
data (``TrainData``: its position), besides the model and the optimizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sized
from typing import Any, cast

from torch import nn
from torch.utils.data import Dataset

from ..backend import Backend, create_backend
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.reader import CheckpointError
from ..checkpoint.training_state import TrainingCheckpoint
from ..config import Config
from ..data import WebDatasetSource
from ..errors import StoppedRun, UserError
from ..rundir import RunDir, RunDirError, RunLease
from .metrics import DeferredMeter, MetricsWriter
from .run_plan import batch_layout, resolve_plan
from .schedule import cosine_lr, plan_steps
from .signals import PreemptionFlag
from .step import OptimizerStep, build_adamw
from .train_data import TrainData

log = logging.getLogger(__name__)


class NonFiniteLossError(StoppedRun):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


class Trainer:
    kind = "train"  # recorded in checkpoints: a trainer resumes only its own kind
    metric_names: tuple[str, ...] = ("loss", "grad_norm")

    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.backend = b = backend or create_backend(cfg.backend.name, cfg.backend.compile_cache, cfg.backend.fsdp)
        self.precision = cfg.backend.precision
        b.check_precision(self.precision)
        b.set_tf32(cfg.backend.tf32)
        b.configure_blocks(cfg.backend.scan, cfg.backend.remat)
        b.manual_seed(cfg.run.seed)
        self.run_dir = RunDir(cfg.run.out_dir)
        self.lease = RunLease(self.run_dir)
        if b.is_main:  # before anything is read or written there: one run per directory
            self.lease.acquire()
            try:
                self.run_dir.check_layout(folders=("checkpoints", "tb"), files=("metrics.jsonl",))
            except RunDirError:
                self.lease.release()
                raise
        self.checkpoints = CheckpointManager(self.run_dir.url_of("checkpoints"), cfg.run.keep_last)
        self.state = TrainingCheckpoint(self, self.checkpoints)
        self.layout = batch_layout(cfg.data.batch_size, cfg.optim, b.global_devices)
        self.step = 0
        self.nonfinite_seen = False
        self.last_metrics: dict[str, float] = {}
        self.last_metrics_step = 0
        self.model: nn.Module

    # ------------------------------------------------------------------ set-up, in this order
    def setup_optimizer(self, param_groups: list[dict[str, Any]]) -> None:
        """After the model is on its device: AdamW with the backend's options and the step that drives it."""
        self.optimizer = build_adamw(param_groups, self.cfg.optim, self.backend, self.layout.lr)
        self.opt_step = OptimizerStep(self.optimizer, self.backend, self.precision, self.cfg.optim.clip_grad)

    def setup_run(self, dataset: Dataset | WebDatasetSource) -> None:
        """After model, optimizer and data: resolve the run plan (what the loop, the schedule and the data position
        read from then on), resume, open the logs."""
        b = self.backend
        per_step = self.layout.batch_per_device * b.global_devices
        samples = len(cast(Sized, dataset))
        steps = plan_steps(self.cfg.schedule, samples, per_step, self.layout.accumulation)
        self.plan = resolve_plan(self.kind, b, self.precision, self.optimizer, self.layout, steps, self.plan_details())
        self.data = TrainData(dataset, self.cfg.data, self.cfg.run.order_seed, b, self.plan, lambda: self.step)
        self.resumed_from = self.state.resume()
        self.plan = dataclasses.replace(self.plan, start_step=self.step)
        log.info("run plan: %s", self.plan.describe())
        if b.is_main:
            self._claim_run_directory()
        if b.world_size > 1:  # processes that write their parts of each checkpoint: all must see one directory
            owner = b.from_main(self.lease.owner if b.is_main else None)
            self._on_every_rank(
                lambda: None if b.is_main else self.lease.check_seen_by(owner, b.rank),
                RunDirError,
                f"run.out_dir={self.run_dir.url}: another rank does not see the lease.json this rank holds there; "
                "every rank must write to the same storage (gs://, a shared filesystem)",
            )
        b.mark_step()  # materialise the initial (or restored) state before the first step's graph
        self.metrics = MetricsWriter(
            self.run_dir,
            b.is_main,
            resume_step=self.step if self.resumed_from else None,
            still_held=self.lease.still_held if b.is_main else None,
        )
        self.meter = DeferredMeter(self.metric_names, b.device)

    def plan_details(self) -> dict[str, Any]:
        """What a subclass adds to the run plan (``RunPlan``'s optional fields)."""
        return {}

    def resolved_plan(self) -> dict[str, Any]:
        """The run plan as checkpoints and ``run.json`` record it."""
        return self.plan.to_dict()

    def _claim_run_directory(self) -> None:
        """A new run never mixes with another in its directory (its logs cut, its checkpoints pruned beside this
        run's, the next resume continuing either): refused, or the other run moved aside with ``run.overwrite``.
        ``run.json`` records what runs here; a resume checks it."""
        run = self.cfg.run
        # The model as its weights see it (name and shape); its attention kernel may change between resumes.
        identity = {"kind": self.kind, "model": {"name": self.cfg.model.name, **self.cfg.model.shape_overrides()}}
        if self.resumed_from:
            if self.run_dir.exists("run.json"):
                recorded = json.loads(self.run_dir.read_text("run.json"))
                for key in ("kind", "model"):
                    if recorded.get(key) != identity[key]:
                        raise RunDirError(
                            f"{self.run_dir.url_of('run.json')}: this directory holds a {recorded.get('kind')} run "
                            f"of {recorded.get('model', {}).get('name')}; resuming it as {self.kind} of "
                            f"{self.cfg.model.name} ({key} differs) would mix two runs: use another run.out_dir"
                        )
            return
        previous = self.run_dir.previous_run()
        if previous and not run.overwrite:
            if run.resume == "auto":  # there was something to resume, and none of it loads
                why = "no checkpoint of it can be loaded (a damaged one is renamed *.corrupt)"
                ways = ""
            else:
                why = f"run.resume={run.resume} starts a new one"
                ways = "run.resume=auto continues it, "
            raise RunDirError(
                f"{self.run_dir.url}: holds another run ({previous}) and {why}; {ways}run.overwrite=true moves it "
                "to previous/ inside the directory and starts anew, or choose another run.out_dir"
            )
        if previous:
            log.warning("run.overwrite: moved the previous run (%s) to %s", previous, self.run_dir.move_aside())
        record = identity | {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": dataclasses.asdict(self.cfg),
            "plan": self.resolved_plan(),
        }
        self.run_dir.write_text("run.json", json.dumps(record, indent=1, default=str) + "\n")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The trainer's own part of a checkpoint (the checkpoint layer adds the model, the optimizer, the RNG, the
        config and the plan): its step, the loss scaler, the data position. A subclass adds its own (EMA weights,
        Mixup's generator, evaluation history): tensors and plain containers only."""
        return {"step": self.step, "scaler": self.opt_step.state_dict(), "data": self.data.state_dict()}

    def load_state_dict(self, state: dict[str, Any], url: str) -> None:
        """Restore what ``state_dict`` gave (``url`` names the checkpoint in errors)."""
        self.step = int(state["step"])
        self.opt_step.load_state_dict(state.get("scaler"))
        self.data.load_state_dict(state.get("data", {}))

    def save_checkpoint(self, final: bool = False) -> str | None:
        """Save unless a non-finite loss has been seen (then the last good checkpoint stays the newest). A sharded
        checkpoint is written in the background except the ``final`` one, which is committed before this returns."""
        self._check_finite()
        if self.nonfinite_seen:
            return None
        elsewhere = (
            f"the checkpoint of step {self.step} in {self.checkpoints.directory} could not be written by another "
            "rank (its own line names the file)"
        )
        # A background write that failed stops every rank here, before the next write's collectives begin.
        self._on_every_rank(self.checkpoints.commit_pending, CheckpointError, elsewhere)
        url = self._on_every_rank(lambda: self.state.save(final), CheckpointError, elsewhere)
        self.metrics.sync(force=True)
        self.backend.barrier()
        return url

    def _on_every_rank(self, part: Callable[[], Any], errors: type[UserError], elsewhere: str) -> Any:
        """Run ``part`` on every rank; when it raises ``errors`` on any rank (a full disk, a directory another rank
        cannot see), every rank stops here with one line, its own or ``elsewhere``: none is left waiting in a
        collective for the one that stopped."""
        failure, result = None, None
        try:
            result = part()
        except errors as e:
            failure = e
        if self.backend.any_rank(failure is not None):
            raise failure or errors(elsewhere)
        return result

    # ------------------------------------------------------------------ metrics
    def lr(self, step: int) -> float:
        return cosine_lr(step, self.plan.total_steps, self.plan.warmup_steps, self.plan.lr, self.cfg.optim.min_lr)

    def flush_metrics(self) -> None:
        """The window's means to metrics.jsonl and TensorBoard (read after the step on XLA)."""
        step, lr = self.step, self.lr(self.step - 1)

        def record(means: dict[str, float], nonfinite: float) -> None:
            if nonfinite > 0:
                self.nonfinite_seen = True
            self.last_metrics = means | {"lr": lr, "data_skipped": self.data.skipped}
            self.last_metrics_step = step
            self.metrics.write(step, self.last_metrics)

        self.meter.flush(self.backend, record)

    def _check_finite(self) -> None:
        """Bring the non-finite count of the current window to the host (one sync; used before saving)."""
        self.flush_metrics()
        self.backend.mark_step()

    def _raise_if_nonfinite(self) -> None:
        if self.nonfinite_seen:
            raise NonFiniteLossError(
                f"non-finite loss by step {self.step}; stopped. The newest checkpoint in {self.checkpoints.directory} "
                f"({self.checkpoints.latest()}) is from before it."
            )

    # ------------------------------------------------------------------ the loop
    def step_inputs(self) -> tuple[Any, ...]:
        """The arguments of the next ``train_step``: by default its micro-batches."""
        return ([self.data.next_batch() for _ in range(self.plan.accumulation)],)

    def train_step(self, *inputs: Any) -> None:
        raise NotImplementedError

    def run_step(self, inputs: tuple[Any, ...] | None = None, cut: bool = True) -> None:
        """One optimizer step, as the loop, the benchmarks, the TPU plan's trace and the tests all run it:
        ``train_step`` on ``inputs`` (default: ``step_inputs()``), the step count, and with ``cut`` the metrics at
        the log cadence and the end of the step's graph (``mark_step``). ``cut=False`` leaves the step's graph
        pending, to be exported or measured rather than run."""
        self.train_step(*(inputs if inputs is not None else self.step_inputs()))
        self.step += 1
        if cut:
            if self.step % self.cfg.run.log_every == 0 or self.step == self.plan.end_step:
                self.flush_metrics()
            self.backend.mark_step()

    def before_training(self) -> None:
        """Hook: runs before the first step (pretraining's initial kNN)."""

    def after_step(self) -> None:
        """Hook: runs after each completed step, before its checkpoint (finetuning's evaluation)."""

    def finish(self, stopped: str, checkpoint: str | None) -> Any:
        """Hook: the run's result, computed before the logs close."""
        return {"step": self.step, "stopped": stopped, "checkpoint": checkpoint}

    def train(self) -> Any:
        cfg, b = self.cfg, self.backend
        preempt = PreemptionFlag()
        progress = None
        stopped, checkpoint = "finished", None
        try:
            self.before_training()
            self.model.train()
            if self.step < self.plan.end_step and b.compiles_step:
                log.info(
                    "step %d: tracing and compiling the step (a minute or more on XLA:CPU; once; XLA's 'Very slow "
                    "compile?' banner during it is its timer, not an error)",
                    self.step + 1,
                )
            t_last, step_last = time.perf_counter(), self.step
            while self.step < self.plan.end_step:
                self.run_step()
                self._raise_if_nonfinite()
                if self.lease.lost:
                    raise RunDirError(
                        f"{self.run_dir.url}: stopped, the run directory was taken over by "
                        f"{self.lease.lost}; no checkpoint written after it"
                    )
                if progress is None and b.is_main and cfg.run.progress:
                    # Opened after the first step so that its rate and ETA leave out compilation.
                    from tqdm import tqdm

                    progress = tqdm(total=self.plan.end_step, initial=self.step, unit="step", dynamic_ncols=True)
                    t_last, step_last = time.perf_counter(), self.step
                elif progress is not None:
                    progress.update(1)
                    now = time.perf_counter()
                    if now - t_last > 2.0:
                        self._show(progress, (self.step - step_last) * self.plan.effective_batch / (now - t_last))
                        t_last, step_last = now, self.step
                preempt.progress = True  # a stop from here on checkpoints this step first
                if b.any_rank(preempt.requested):  # every rank stops at this boundary, whichever got the signal
                    stopped = "preempted"
                    break
                self.after_step()
                if cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0 and self.step < self.plan.end_step:
                    self.save_checkpoint()
            if stopped == "finished" and self.step < self.plan.total_steps:
                stopped = "max_steps"
            checkpoint = self.save_checkpoint(final=True)
            self._raise_if_nonfinite()
            if progress is not None:
                self._show(progress, None)  # the final window's figures, the same as the summary's
            return self.finish(stopped, checkpoint)
        finally:
            if stopped == "preempted":
                # The notice reaches other ranks' processes late; one arriving while this process cleans up (its
                # checkpoint committed) must not kill it and turn a clean stop into a failed one.
                preempt.ignore_further()
            else:
                preempt.restore()
            if progress is not None:
                progress.close()
            self.checkpoints.commit_pending()  # a background write that finished is committed; never lost silently
            self.metrics.close()
            self.lease.release()
            if stopped == "preempted":
                preempt.restore()  # ignoring them was for the clean-up; a caller that exits next re-ignores them

    def _show(self, progress, img_s: float | None) -> None:
        shown = {} if img_s is None else {"img_s": f"{img_s:.0f}"}
        if "loss" in self.last_metrics:
            shown[f"loss@{self.last_metrics_step}"] = f"{self.last_metrics['loss']:.4f}"
        progress.set_postfix(shown)
