"""Finetuning a classifier from a pretrained encoder, on the same backend layer as pretraining.

The release's recipe through timm: layer-wise lr decay parameter groups, drop path, soft-target cross-entropy
with label smoothing, Mixup/CutMix (in fixed shapes, ``mixup.py``), RandAugment and random erasing (ImageFolder),
optional EMA of the weights. Evaluation splits the held-out set over ranks without padding duplicates: each
rank's last batch is filled up to the fixed batch size and masked, so every sample counts exactly once and the
shapes never change.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..backend import Backend, create_backend
from ..config import Config
from ..data import (
    DataError,
    ImageFolderDataset,
    build_eval_datasets,
    build_train_dataset,
    build_train_loader,
    timm_transform,
)
from ..models import digpt_config
from ..models.classifier import create_classifier, load_pretrained_encoder, read_pretrain_state
from .checkpoint import CheckpointManager, load_checkpoint
from .metrics import DeferredMeter, MetricsWriter
from .mixup import FixedShapeMixup
from .pretrain import accumulation_steps, clip_grad_norm, git_revision, init_adamw_state
from .schedule import cosine_lr, plan_steps, scaled_lr

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    top1: float
    top5: float
    samples: int


def finetune_datasets(cfg: Config, img_size: int) -> tuple[Dataset, Dataset]:
    """(augmented training set, evaluation set) of the configured source."""
    d, f = cfg.data, cfg.finetune
    if d.source == "digits":
        _, held_out = build_eval_datasets(d, img_size)  # type: ignore[misc]
        return build_train_dataset(d, img_size), held_out
    if d.source == "imagefolder":
        if not d.root or not f.val_root:
            raise DataError("finetuning on imagefolder needs data.root (train) and finetune.val_root (evaluation)")
        train_tf = timm_transform(img_size, training=True, auto_augment=f.auto_augment or None, re_prob=f.reprob)
        return (ImageFolderDataset(d.root, train_tf),
                ImageFolderDataset(f.val_root, timm_transform(img_size, training=False)))  # fmt: skip
    raise DataError(f"finetuning reads digits or imagefolder, not data.source={d.source!r}")


class _Shard(Dataset):
    """Rank ``rank``'s share of a dataset (indices rank, rank + world, ...), padded to whole batches of ``batch``
    with a ``valid`` flag of 0 on the padding."""

    def __init__(self, dataset: Dataset, rank: int, world: int, batch: int) -> None:
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world))  # type: ignore[arg-type]
        self.length = max(1, math.ceil(len(self.indices) / batch)) * batch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        valid = i < len(self.indices)
        item = self.dataset[self.indices[i] if valid else self.indices[0] if self.indices else 0]
        return {"images": item["images"], "labels": item["labels"], "valid": torch.tensor(float(valid))}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, backend: Backend, batch_size: int, num_workers: int = 0,
             precision: str = "fp32"):  # fmt: skip
    """Top-1 / top-5 (%) over every sample of ``dataset`` exactly once, summed over all ranks, in the numeric
    setting the model was trained in."""
    model.eval()
    shard = _Shard(dataset, backend.data_rank, backend.data_world_size, batch_size)
    loader = backend.prepare_loader(DataLoader(shard, batch_size=batch_size, num_workers=num_workers))
    totals = torch.zeros(3).to(backend.device)
    for batch in loader:
        with backend.autocast(precision):
            logits = model(batch["images"]).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == batch["labels"][:, None]
        valid = batch["valid"]
        totals = totals + torch.stack([(hit[:, 0] * valid).sum(), (hit.any(dim=1) * valid).sum(), valid.sum()])
        backend.mark_step()
    totals = backend.all_reduce_mean(totals) * backend.data_world_size
    top1, top5, n = backend.to_cpu(totals).tolist()
    model.train()
    return EvalResult(100.0 * top1 / n, 100.0 * top5 / n, int(round(n)))


class Finetuner:
    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        self.cfg, f = cfg, cfg.finetune
        self.backend = b = backend or create_backend(cfg.backend.name, cfg.backend.compile_cache)
        self.precision = cfg.backend.precision
        b.check_precision(self.precision)
        b.manual_seed(cfg.run.seed)
        self.model_cfg = digpt_config(cfg.model.name, **cfg.model.shape_overrides())
        model = create_classifier(self.model_cfg, f.num_classes, drop_path_rate=f.drop_path)
        if f.checkpoint:
            dropped = load_pretrained_encoder(model, read_pretrain_state(f.checkpoint))
            log.info("encoder from %s (%d pretraining tensors dropped)", f.checkpoint, len(dropped))
        self.model = b.prepare_model(model)
        self.ema = None
        if f.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(b.unwrap(self.model), decay=f.ema_decay)
        self.process_batch = cfg.data.batch_size * b.devices_per_process
        global_micro = cfg.data.batch_size * b.global_devices
        self.accum = accumulation_steps(cfg.optim.accum_steps, cfg.optim.effective_batch, global_micro)
        self.effective_batch = global_micro * self.accum
        self.base_lr = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.blr, self.effective_batch)
        unwrapped = b.unwrap(self.model)
        groups = param_groups_layer_decay(unwrapped, cfg.optim.weight_decay, unwrapped.no_weight_decay(),
                                          layer_decay=f.layer_decay)  # fmt: skip
        self.optimizer = torch.optim.AdamW(groups, lr=self.base_lr, betas=tuple(cfg.optim.betas),
                                           **b.optimizer_options())  # fmt: skip
        init_adamw_state(self.optimizer)
        self.train_set, self.eval_set = finetune_datasets(cfg, self.model_cfg.img_size)
        self.mixup = FixedShapeMixup(f.num_classes, f.mixup, f.cutmix, f.smoothing, seed=cfg.run.seed)
        self.criterion = SoftTargetCrossEntropy()
        plan = plan_steps(cfg.schedule, len(self.train_set), self.process_batch * b.data_world_size, self.accum)  # type: ignore[arg-type]
        self.total_steps, self.warmup_steps, self.end_step = plan.total_steps, plan.warmup_steps, plan.end_step
        self.checkpoints = CheckpointManager(os.path.join(cfg.run.out_dir, "checkpoints"), cfg.run.keep_last)
        self.step = 0
        latest = self.checkpoints.latest() if cfg.run.resume == "auto" else None
        if latest:
            state = load_checkpoint(latest)
            unwrapped.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = state["step"]
            log.info("resumed from %s at step %d", latest, self.step)
        b.mark_step()
        self.meter = DeferredMeter(("loss", "grad_norm"), b.device)
        self.metrics = MetricsWriter(cfg.run.out_dir, b.is_main, resume_step=self.step if latest else None)

    def train_step(self, batches: list[dict[str, Tensor]]) -> None:
        b, model, opt = self.backend, self.model, self.optimizer
        lr = cosine_lr(self.step, self.total_steps, self.warmup_steps, self.base_lr, self.cfg.optim.min_lr)
        for micro, batch in enumerate(batches):
            with b.no_sync(model, skip=micro < len(batches) - 1):
                mask, lam = self.mixup.draw(self.model_cfg.img_size)
                images, targets = self.mixup(batch["images"], batch["labels"], b.move(mask),
                                             b.move(torch.tensor(lam)))  # fmt: skip
                with b.autocast(self.precision):
                    loss = self.criterion(model(images).float(), targets)
                (loss / len(batches)).backward()
        for group in opt.param_groups:
            group["lr"] = b.learning_rate(lr * group.get("lr_scale", 1.0))
        b.reduce_gradients(opt)
        norm = clip_grad_norm(model, self.cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(b.unwrap(model), step=self.step)
        self.meter.add(loss=loss, grad_norm=norm)

    def save_checkpoint(self) -> str | None:
        b = self.backend
        state = {
            "model": b.to_cpu(b.unwrap(self.model).state_dict()),
            "optimizer": b.to_cpu(self.optimizer.state_dict()),
            "step": self.step,
            "config": self.cfg.to_dict(),
            "git_revision": git_revision(),
        }
        if self.ema is not None:
            state["ema"] = b.to_cpu(self.ema.module.state_dict())
        url = self.checkpoints.save(state, self.step) if b.is_main else None
        b.barrier()
        return url

    def _flush(self) -> None:
        step = self.step

        def record(means: dict[str, float], nonfinite: float) -> None:
            if nonfinite > 0:
                raise FloatingPointError(f"non-finite finetuning loss by step {step}")
            self.metrics.write(step, means)

        self.meter.flush(self.backend, record)

    def train(self) -> dict[str, Any]:
        cfg, b = self.cfg, self.backend
        loader = build_train_loader(self.train_set, self.process_batch, b.data_rank, b.data_world_size, cfg.run.seed,
                                    start_batch=self.step * self.accum, num_workers=cfg.data.num_workers)  # fmt: skip
        stream = iter(b.prepare_loader(loader))
        self.model.train()
        try:
            while self.step < self.end_step:
                self.train_step([next(stream) for _ in range(self.accum)])
                self.step += 1
                if self.step % cfg.run.log_every == 0 or self.step == self.end_step:
                    self._flush()
                b.mark_step()
                if cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0 and self.step < self.end_step:
                    self.save_checkpoint()
            checkpoint = self.save_checkpoint()
        finally:
            self.metrics.close()
        bs = cfg.finetune.eval_batch_size
        result = evaluate(self.model, self.eval_set, b, bs, cfg.data.num_workers, self.precision)
        out: dict[str, Any] = {"step": self.step, "checkpoint": checkpoint, "top1": result.top1, "top5": result.top5,
                               "eval_samples": result.samples}  # fmt: skip
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.eval_set, b, bs, cfg.data.num_workers, self.precision)
            out |= {"ema_top1": ema.top1, "ema_top5": ema.top5}
        if b.is_main:
            with open(os.path.join(cfg.run.out_dir, "finetune.json"), "w") as f:
                json.dump(out, f, indent=1)
        return out
