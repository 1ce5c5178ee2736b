"""The pretraining loop: one code path for cpu, cuda (DDP under torchrun), xla (PJRT) and xla-spmd.

Nothing in a step reads a tensor on the host: losses, grad norm and the non-finite count are summed on the
device and handed to the backend's deferred ``on_host`` callback once per log interval (and before every
checkpoint, so a checkpoint is never written after a non-finite loss).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn

from ..backend import Backend
from ..config import Config
from ..data import build_eval_datasets, build_train_dataset
from ..models import DiGPT
from ..precision import stored_bytes, teacher_precision
from .build import build_model_and_teacher, build_student, distill_forward, segment_orders
from .knn import knn_accuracy
from .trainer import NonFiniteLossError, Trainer

log = logging.getLogger(__name__)
__all__ = ["NonFiniteLossError", "Pretrainer", "TrainResult"]


@dataclass
class TrainResult:
    step: int
    stopped: str  # "finished" | "max_steps" | "preempted"
    last_metrics: dict[str, float]
    checkpoint: str | None
    knn: dict[str, float]


class Pretrainer(Trainer):
    kind = "pretrain"
    metric_names = ("loss", "ar_loss", "kd_loss", "grad_norm")

    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        super().__init__(cfg, backend)
        b = self.backend
        self.teacher_precision = teacher_precision(cfg.teacher.precision, self.precision)
        b.check_precision(self.teacher_precision, role="teacher")
        b.check_attention(cfg.model.attention)
        built, teacher = build_model_and_teacher(cfg.model, cfg.teacher)
        self.model_cfg = built.cfg
        model: nn.Module = built
        if cfg.backend.compile:
            model, teacher = b.compile_module(model), b.compile_module(teacher)
        self.model = b.prepare_model(model, self.precision)  # on the device before the optimizer is built
        self.teacher_placement = b.dims.teacher_placement(
            cfg.teacher.placement, stored_bytes(teacher, self.teacher_precision), b.device_memory_bytes()
        )
        self.teacher = b.prepare_frozen(
            teacher, shard=self.teacher_placement == "fsdp", precision=self.teacher_precision
        )
        self.setup_optimizer(cast(DiGPT, b.unwrap(self.model)).weight_decay_groups(cfg.optim.weight_decay))
        self.dataset = build_train_dataset(cfg.data, self.model_cfg.img_size)
        self.setup_run(self.dataset)
        self.knn: dict[str, float] = {}
        log.info(
            "model %s (%.1fM trainable) on %s",
            cfg.model.name,
            cast(DiGPT, b.unwrap(self.model)).num_trainable_params() / 1e6,
            b.describe(),
        )

    def plan_details(self) -> dict[str, Any]:
        return {
            "teacher_precision": self.teacher_precision,
            "teacher_placement": self.teacher_placement,
            "attention": self.cfg.model.attention,
        }

    def state_dict(self) -> dict[str, Any]:
        shape = self.model_cfg.__dict__ | {"feature_taps": list(self.model_cfg.feature_taps)}
        return super().state_dict() | {"model_config": shape}

    # ------------------------------------------------------------------ the step
    def forward_backward(self, batches: list[dict[str, Tensor]], orders: list[Tensor]) -> tuple[Tensor, ...]:
        """Teacher and student on each micro-batch, gradients accumulated; returns (loss, ar_loss, kd_loss) of the
        last micro-batch as device tensors."""
        b, model = self.backend, self.model
        for micro, (batch, order) in enumerate(zip(batches, orders, strict=True)):
            with b.no_sync(model, skip=micro < len(batches) - 1):
                _, out = distill_forward(
                    model,
                    self.teacher,
                    batch["images"],
                    None,
                    order,
                    b.autocast,
                    self.precision,
                    self.teacher_precision,
                )
                loss = out.ar_loss + out.kd_loss
                self.opt_step.backward(loss, len(batches))
        return loss, out.ar_loss, out.kd_loss

    def train_step(self, batches: list[dict[str, Tensor]], orders: list[Tensor]) -> None:
        loss, ar_loss, kd_loss = self.forward_backward(batches, orders)
        grad_norm = self.opt_step.step(self.lr(self.step))
        self.meter.add(loss=loss, ar_loss=ar_loss, kd_loss=kd_loss, grad_norm=grad_norm)

    def step_inputs(self) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
        """The micro-batches and segment orders of the current step, on the device."""
        micro_batches = [self.data.next_batch() for _ in range(self.plan.accumulation)]
        orders = [self.backend.move(self._orders(self.step, m)) for m in range(self.plan.accumulation)]
        return micro_batches, orders

    def _orders(self, step: int, micro: int) -> Tensor:
        b = self.backend
        full = segment_orders(
            self.cfg.run.order_seed,
            step,
            micro,
            self.plan.batch_per_device * self.plan.devices,
            self.model_cfg.num_segments,
        )
        start = b.data_rank * self.data.process_batch
        return full[start : start + self.data.process_batch]

    # ------------------------------------------------------------------ evaluation
    def before_training(self) -> None:
        if self.cfg.run.knn_eval and self.step == 0:
            self._record_knn("knn_top1_init")

    def finish(self, stopped: str, checkpoint: str | None) -> TrainResult:
        if self.cfg.run.knn_eval:
            self._record_knn("knn_top1")
        return TrainResult(self.step, stopped, dict(self.last_metrics), checkpoint, dict(self.knn))

    def _record_knn(self, key: str) -> None:
        value = self.knn_eval()
        if math.isnan(value):
            log.warning(
                "run.knn_eval: data.source=%s has no labelled held-out split; kNN skipped", self.cfg.data.source
            )
            return
        self.knn[key] = value
        log.info("%s = %.2f%% at step %d (k=20, cosine, on the held-out split)", key, value, self.step)
        self.metrics.write(self.step, {key: value})

    def knn_eval(self) -> float:
        """kNN top-1 (%) of the encoder's features on the held-out split, computed on a CPU copy."""
        sets = build_eval_datasets(self.cfg.data, self.model_cfg.img_size)
        if sets is None:
            return math.nan
        model = build_student(self.cfg.model, self.model_cfg, self.backend.model_state_cpu(self.model))
        return knn_accuracy(model, *sets)
