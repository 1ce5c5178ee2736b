"""The pretraining loop: one code path for cpu, cuda (DDP under torchrun), xla (PJRT) and xla-spmd.

Nothing in a step reads a tensor on the host: losses, grad norm and the non-finite count are summed on the
device and handed to the backend's deferred ``on_host`` callback once per log interval (and before every
checkpoint, so a checkpoint is never written after a non-finite loss).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from ..backend import Backend, create_backend
from ..config import Config
from ..data import build_eval_datasets, build_train_dataset, build_train_loader
from ..models import DiGPT, digpt_config, random_segment_order, set_fused_attention
from ..models.digpt import DiGPTConfig
from ..teacher import ClipTeacher, PixelTeacher
from .checkpoint import CheckpointManager, load_checkpoint
from .knn import knn_accuracy
from .metrics import DeferredMeter, MetricsWriter
from .schedule import cosine_lr, plan_steps, scaled_lr
from .signals import PreemptionFlag

log = logging.getLogger(__name__)
METRIC_NAMES = ("loss", "ar_loss", "kd_loss", "grad_norm")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    stopped: str  # "finished" | "max_steps" | "preempted"
    last_metrics: dict[str, float]
    checkpoint: str | None
    knn: dict[str, float]


def git_revision() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_teacher(cfg: Config, model_cfg: DiGPTConfig) -> nn.Module:
    if cfg.teacher.kind == "pixel":
        return PixelTeacher(model_cfg.patch_size, model_cfg.img_size)
    return ClipTeacher(cfg.teacher.clip_model, cfg.teacher.checkpoint or None)


def build_model_and_teacher(cfg: Config) -> tuple[DiGPT, nn.Module]:
    """The student sized to predict its teacher's tokens (grid and width come from the teacher)."""
    shape = digpt_config(cfg.model.name, **cfg.model.shape_overrides())
    teacher = build_teacher(cfg, shape)
    model_cfg = digpt_config(
        cfg.model.name, **cfg.model.shape_overrides(), teacher_grid=teacher.grid_size, teacher_dim=teacher.dim
    )
    model = DiGPT(model_cfg)
    set_fused_attention(model, cfg.model.fused_attention)
    return model, teacher


def init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's per-parameter state now, as its first ``step()`` would (zeros, step 0).

    On XLA the first step would otherwise trace a graph of its own (state creation inside it) and compile twice.
    """
    for group in optimizer.param_groups:
        if group["amsgrad"]:
            raise ValueError("init_adamw_state supports AdamW without amsgrad")
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                # torch keeps the step count with the parameter when capturable or fused, on the host otherwise
                on_device = {"device": p.device} if group["capturable"] or group["fused"] else {}
                state["step"] = torch.zeros((), dtype=torch.float32, **on_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def clip_grad_norm(model: nn.Module, clip: float | None) -> Tensor:
    """The total gradient norm (a device tensor), after clipping the gradients to ``clip`` when it is set."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def accumulation_steps(accum_steps: int, effective_batch: int | None, global_micro_batch: int) -> int:
    if effective_batch is None:
        return accum_steps
    if effective_batch % global_micro_batch:
        raise ValueError(
            f"optim.effective_batch={effective_batch} is not a multiple of the global micro-batch "
            f"{global_micro_batch} (data.batch_size x devices); change one of them"
        )
    return effective_batch // global_micro_batch


def segment_orders(seed: int, step: int, micro: int, global_batch: int, num_segments: int) -> Tensor:
    """(global_batch, S) orders for one micro-batch, a function of (seed, step, micro) only: identical on every
    backend and rank count, and reproduced exactly after a resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 131 + micro)
    return random_segment_order(global_batch, num_segments, "cpu", generator=g)


class Pretrainer:
    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.backend = b = backend or create_backend(cfg.backend.name, cfg.backend.compile_cache)
        self.precision = cfg.backend.precision
        self.teacher_precision = self.precision if cfg.teacher.precision == "auto" else cfg.teacher.precision
        b.check_precision(self.precision)
        b.check_precision(self.teacher_precision)
        b.manual_seed(cfg.run.seed)

        model, teacher = build_model_and_teacher(cfg)
        self.model_cfg = model.cfg
        if cfg.backend.compile:
            model, teacher = b.compile_module(model), b.compile_module(teacher)
        self.model = b.prepare_model(model)  # on the device before the optimizer is built
        self.teacher = b.prepare_frozen(teacher)
        opt = cfg.optim
        self.process_batch = cfg.data.batch_size * b.devices_per_process
        self.global_micro_batch = cfg.data.batch_size * b.global_devices
        self.accum = accumulation_steps(opt.accum_steps, opt.effective_batch, self.global_micro_batch)
        self.effective_batch = self.global_micro_batch * self.accum
        self.base_lr = opt.lr if opt.lr is not None else scaled_lr(opt.blr, self.effective_batch)
        self.optimizer = torch.optim.AdamW(
            param_groups_weight_decay(b.unwrap(self.model), opt.weight_decay),
            lr=self.base_lr,  # a float: torch checks it on the host; optimizer_step sets the backend's form
            betas=tuple(opt.betas),
            **b.optimizer_options(),
        )
        self.scaler = b.grad_scaler(self.precision)
        init_adamw_state(self.optimizer)

        self.dataset = build_train_dataset(cfg.data, self.model_cfg.img_size)
        self.run_dir = cfg.run.out_dir
        self.checkpoints = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), cfg.run.keep_last)
        self.step = 0
        self.data_skipped = 0  # unreadable samples this rank's loader skipped (the checkpoint holds rank 0's)
        self._resumed_data: dict[str, Any] = {}
        resume_from = self._resume_source()
        if resume_from:
            self._restore(resume_from)
        b.mark_step()  # materialise the initial (or restored) state before the first step's graph

        plan = plan_steps(cfg.schedule, len(self.dataset), self.process_batch * b.data_world_size, self.accum)
        self.steps_per_epoch, self.total_steps = plan.steps_per_epoch, plan.total_steps
        self.warmup_steps, self.end_step = plan.warmup_steps, plan.end_step
        if resume_from:
            self._check_resumed_data_position(self._resumed_data)

        self.metrics = MetricsWriter(self.run_dir, b.is_main, resume_step=self.step if resume_from else None)
        self.meter = DeferredMeter(METRIC_NAMES, b.device)
        self.last_metrics: dict[str, float] = {}
        self.nonfinite_seen = False
        self.knn: dict[str, float] = {}
        log.info(
            "backend %s | model %s (%.1fM trainable) | effective batch %d | lr %.3g | steps %d..%d of %d",
            b.describe(), cfg.model.name, b.unwrap(self.model).num_trainable_params() / 1e6,
            self.effective_batch, self.base_lr, self.step, self.end_step, self.total_steps,
        )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def _resume_source(self) -> str | None:
        resume = self.cfg.run.resume
        if resume == "never":
            return None
        if resume == "auto":
            return self.checkpoints.latest()
        return resume

    def _restore(self, url: str) -> None:
        state = load_checkpoint(url)
        self.backend.unwrap(self.model).load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.backend.set_rng_state(state["rng"])
        self.step = state["step"]
        self._resumed_data = state.get("data", {})
        log.info("resumed from %s at step %d", url, self.step)

    def state_dict(self) -> dict[str, Any]:
        b = self.backend
        return {
            "model": b.to_cpu(b.unwrap(self.model).state_dict()),
            "optimizer": b.to_cpu(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "data": self.data_position(),
            "rng": b.rng_state(),
            "config": self.cfg.to_dict(),
            "model_config": self.model_cfg.__dict__ | {"feature_taps": list(self.model_cfg.feature_taps)},
            "git_revision": git_revision(),
        }

    def data_position(self) -> dict[str, Any]:
        """Where this rank's data stream stands; a resume restarts the loader at ``consumed_batches``."""
        consumed = self.step * self.accum
        return {
            "source": self.cfg.data.source,
            "consumed_batches": consumed,
            "process_batch": self.process_batch,
            "world_size": self.backend.data_world_size,
            "num_workers": self.cfg.data.num_workers,
            "epoch": consumed // (self.steps_per_epoch * self.accum),
            "samples_consumed": consumed * self.process_batch * self.backend.data_world_size,
            "skipped_samples": self.data_skipped,
        }

    def _check_resumed_data_position(self, saved: dict[str, Any]) -> None:
        now = self.data_position() | {"consumed_batches": saved.get("consumed_batches")}
        for key in ("source", "process_batch", "world_size", "num_workers"):
            if key in saved and saved[key] != now[key]:
                log.warning(
                    "resuming with data %s=%s where the checkpoint has %s: the data order after the resume differs "
                    "from the uninterrupted run's", key, now[key], saved[key],
                )  # fmt: skip
        self.data_skipped = saved.get("skipped_samples", 0)

    def save_checkpoint(self) -> str | None:
        """Save unless a non-finite loss has been seen (then the last good checkpoint stays the newest)."""
        self._check_finite()
        if self.nonfinite_seen:
            return None
        state = self.state_dict()  # every rank takes part: on XLA this syncs pending work
        url = None
        if self.backend.is_main:
            url = self.checkpoints.save(state, self.step)
            log.info("saved %s", url)
        self.backend.barrier()
        return url

    # ------------------------------------------------------------------ metrics
    def _flush_metrics(self, lr: float) -> None:
        step = self.step

        def record(means: dict[str, float], nonfinite: float) -> None:
            if nonfinite > 0:
                self.nonfinite_seen = True
            self.last_metrics = means | {"lr": lr, "data_skipped": self.data_skipped}
            self.metrics.write(step, self.last_metrics)

        self.meter.flush(self.backend, record)

    def _check_finite(self) -> None:
        """Bring the non-finite count of the current window to the host (one sync; used before saving)."""
        self._flush_metrics(self._lr(self.step - 1))
        self.backend.mark_step()

    def _lr(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.warmup_steps, self.base_lr, self.cfg.optim.min_lr)

    # ------------------------------------------------------------------ the step
    def forward_backward(self, batches: list[dict[str, Tensor]], orders: list[Tensor]) -> tuple[Tensor, ...]:
        """Teacher and student on each micro-batch, gradients accumulated; returns (loss, ar_loss, kd_loss) of the
        last micro-batch as device tensors."""
        b, model = self.backend, self.model
        for micro, (batch, order) in enumerate(zip(batches, orders, strict=True)):
            with b.no_sync(model, skip=micro < len(batches) - 1):
                images = batch["images"]
                with b.autocast(self.teacher_precision):
                    targets = self.teacher(images).float()
                with b.autocast(self.precision):
                    out = model(images, targets, order)
                loss = out.ar_loss + out.kd_loss
                scaled = loss / len(batches)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss, out.ar_loss, out.kd_loss

    def optimizer_step(self, lr: float) -> Tensor:
        """Reduce gradients across replicas, clip, step, zero; returns the (pre-clip) gradient norm."""
        b, opt = self.backend, self.optimizer
        for group in opt.param_groups:
            group["lr"] = b.learning_rate(lr)
        b.reduce_gradients(opt)
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        grad_norm = clip_grad_norm(self.model, self.cfg.optim.clip_grad)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return grad_norm

    def train_step(self, batches: list[dict[str, Tensor]], orders: list[Tensor]) -> None:
        loss, ar_loss, kd_loss = self.forward_backward(batches, orders)
        grad_norm = self.optimizer_step(self._lr(self.step))
        self.meter.add(loss=loss, ar_loss=ar_loss, kd_loss=kd_loss, grad_norm=grad_norm)

    def next_step_inputs(self, batches) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
        """The micro-batches and segment orders of the current step, on the device."""
        micro_batches = [next(batches) for _ in range(self.accum)]
        orders = [self.backend.move(self._orders(self.step, m)) for m in range(self.accum)]
        return micro_batches, orders

    def device_batches(self):
        """This rank's endless stream of device batches, starting where the current step's data begins."""
        cfg, b = self.cfg, self.backend
        loader = build_train_loader(
            self.dataset, self.process_batch, b.data_rank, b.data_world_size, cfg.run.seed,
            start_batch=self.step * self.accum, num_workers=cfg.data.num_workers,
        )  # fmt: skip
        return iter(b.prepare_loader(_CountSkipped(loader, self)))

    def _orders(self, step: int, micro: int) -> Tensor:
        b = self.backend
        full = segment_orders(self.cfg.run.seed, step, micro, self.global_micro_batch, self.model_cfg.num_segments)
        start = b.data_rank * self.process_batch
        return full[start : start + self.process_batch]

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg, b = self.cfg, self.backend
        if cfg.run.knn_eval and self.step == 0:
            self.knn["knn_top1_init"] = self.knn_eval()
        batches = self.device_batches()
        preempt = PreemptionFlag()
        progress = None
        if b.is_main and cfg.run.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.end_step, initial=self.step, unit="step", dynamic_ncols=True)
        stopped, t_last, step_last = "finished", time.perf_counter(), self.step
        try:
            self.model.train()
            while self.step < self.end_step:
                self.train_step(*self.next_step_inputs(batches))
                self.step += 1
                if self.step % cfg.run.log_every == 0 or self.step == self.end_step:
                    self._flush_metrics(self._lr(self.step - 1))
                b.mark_step()
                if self.nonfinite_seen:
                    raise NonFiniteLossError(
                        f"non-finite loss by step {self.step}; stopped. The newest checkpoint in "
                        f"{self.checkpoints.directory} ({self.checkpoints.latest()}) is from before it."
                    )
                if progress is not None:
                    progress.update(1)
                    now = time.perf_counter()
                    if now - t_last > 2.0:
                        img_s = (self.step - step_last) * self.effective_batch / (now - t_last)
                        shown = {"img_s": f"{img_s:.0f}"}
                        if "loss" in self.last_metrics:
                            shown["loss"] = f"{self.last_metrics['loss']:.4f}"
                        progress.set_postfix(shown)
                        t_last, step_last = now, self.step
                if preempt.requested:
                    stopped = "preempted"
                    break
                if cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0 and self.step < self.end_step:
                    self.save_checkpoint()
            if stopped == "finished" and self.step < self.total_steps:
                stopped = "max_steps"
            checkpoint = self.save_checkpoint()
            if self.nonfinite_seen:
                raise NonFiniteLossError(f"non-finite loss by step {self.step}; the last good checkpoint is kept")
        finally:
            preempt.restore()
            if progress is not None:
                progress.close()
            self.metrics.close()
        if cfg.run.knn_eval:
            self.knn["knn_top1"] = self.knn_eval()
        return TrainResult(self.step, stopped, dict(self.last_metrics), checkpoint, dict(self.knn))

    def knn_eval(self) -> float:
        """kNN top-1 (%) of the encoder's features on the held-out split, computed on a CPU copy."""
        sets = build_eval_datasets(self.cfg.data, self.model_cfg.img_size)
        if sets is None:
            return math.nan
        model = DiGPT(self.model_cfg)
        model.load_state_dict(self.backend.to_cpu(self.backend.unwrap(self.model).state_dict()))
        set_fused_attention(model, self.cfg.model.fused_attention)
        return knn_accuracy(model, *sets)


class _CountSkipped:
    """Host-side pass over the loader's batches: adds each batch's ``skipped`` count (a CPU tensor, so no device
    sync) to the trainer's ``data_skipped`` and drops it before the batch moves to the device."""

    def __init__(self, loader, trainer: Pretrainer) -> None:
        self.loader, self.trainer = loader, trainer

    def __iter__(self):
        for batch in self.loader:
            skipped = batch.pop("skipped", None)
            if skipped is not None:
                self.trainer.data_skipped += int(skipped.sum())
            yield batch

    def __len__(self) -> int:
        return len(self.loader)
