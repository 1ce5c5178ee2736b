"""Finetuning a classifier from a pretrained encoder, on the same backend layer as pretraining.

The release's recipe through timm: layer-wise lr decay parameter groups, drop path, soft-target cross-entropy
with label smoothing, Mixup/CutMix (in fixed shapes, ``mixup.py``), RandAugment and random erasing (ImageFolder),
optional EMA of the weights. Evaluation splits the held-out set over ranks without padding duplicates: each
rank's last batch is filled up to the fixed batch size and masked, so every sample counts exactly once and the
shapes never change.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..backend import Backend
from ..backend.mesh import ParallelDims
from ..checkpoint.reader import CheckpointError, load_model_state, read_state_dict
from ..config import Config, ConfigError
from ..data import finetune_datasets
from ..models import digpt_config
from ..models.classifier import create_classifier, load_pretrained_encoder
from .mixup import FixedShapeMixup
from .trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    top1: float
    top5: float
    samples: int


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
def evaluate(
    model: nn.Module, dataset: Dataset, backend: Backend, batch_size: int, num_workers: int = 0, precision: str = "fp32"
):
    """Top-1 / top-5 (%) over every sample of ``dataset`` exactly once, summed over all ranks, in the numeric
    setting the model was trained in."""
    model.eval()
    shard = _Shard(dataset, backend.data_rank, backend.data_world_size, batch_size)
    loader = backend.prepare_loader(
        DataLoader(shard, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    )  # leaves the global RNG alone
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


class Finetuner(Trainer):
    kind = "finetune"
    metric_names = ("loss", "grad_norm")

    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        problem = ParallelDims(cfg.backend.name, cfg.backend.fsdp).finetune_problem()
        if problem:
            raise ConfigError(problem)
        super().__init__(cfg, backend)
        b, f = self.backend, cfg.finetune
        self.model_cfg = digpt_config(cfg.model.name, **cfg.model.shape_overrides())
        self.train_set, self.eval_set = finetune_datasets(cfg, self.model_cfg.img_size)
        model = create_classifier(self.model_cfg, f.num_classes, drop_path_rate=f.drop_path)
        if f.checkpoint:
            dropped = load_pretrained_encoder(model, read_state_dict(f.checkpoint), f.checkpoint)
            log.info("encoder from %s (%d pretraining tensors dropped)", f.checkpoint, len(dropped))
        self.model = b.prepare_model(model)
        self.ema = None
        if f.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(b.unwrap(self.model), decay=f.ema_decay)
        unwrapped = cast(Any, b.unwrap(self.model))  # timm's VisionTransformer
        self.setup_optimizer(
            param_groups_layer_decay(
                unwrapped, cfg.optim.weight_decay, unwrapped.no_weight_decay(), layer_decay=f.layer_decay
            )
        )
        self.mixup = FixedShapeMixup(f.num_classes, f.mixup, f.cutmix, f.smoothing, seed=cfg.run.seed)
        self.criterion = SoftTargetCrossEntropy()
        self.evals: list[dict[str, float]] = []  # one record per evaluation, kept in the checkpoint
        self.setup_run(self.train_set)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict() | {"mixup_rng": self.mixup.rng.getstate(), "evals": list(self.evals)}
        if self.ema is not None:
            state["ema"] = self.backend.to_cpu(self.ema.module.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any], url: str) -> None:
        super().load_state_dict(state, url)
        if self.ema is not None:
            if "ema" not in state:
                raise CheckpointError(f"{url}: has no EMA weights but finetune.ema=true")
            load_model_state(self.ema.module, state["ema"], f"{url} (ema)")
        self.mixup.rng.setstate(state["mixup_rng"])
        self.evals = list(state.get("evals", []))

    # ------------------------------------------------------------------ the step
    def train_step(self, batches: list[dict[str, Tensor]]) -> None:
        b, model = self.backend, self.model
        for micro, batch in enumerate(batches):
            with b.no_sync(model, skip=micro < len(batches) - 1):
                mask, lam = self.mixup.draw(self.model_cfg.img_size)
                images, targets = self.mixup(
                    batch["images"], batch["labels"], b.replicate(mask), b.replicate(torch.tensor(lam))
                )
                with b.autocast(self.precision):
                    loss = self.criterion(model(images).float(), targets)
                self.opt_step.backward(loss, len(batches))
        norm = self.opt_step.step(self.lr(self.step))
        if self.ema is not None:
            self.ema.update(b.unwrap(model), step=self.step)
        self.meter.add(loss=loss, grad_norm=norm)

    # ------------------------------------------------------------------ evaluation
    def _evaluation_due(self) -> bool:
        every = self.cfg.finetune.eval_every_epochs
        done = bool(self.evals) and self.evals[-1]["step"] == self.step
        return bool(every) and self.step > 0 and self.step % (every * self.plan.steps_per_epoch) == 0 and not done

    def before_training(self) -> None:
        if self._evaluation_due():  # a run preempted right at an epoch boundary skipped that evaluation
            self.evaluate()

    def after_step(self) -> None:
        if self._evaluation_due():
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 of the model (and of its EMA) on the held-out set, appended to the history and to
        metrics.jsonl with the best top-1 so far."""
        cfg, b = self.cfg, self.backend
        bs, workers = cfg.finetune.eval_batch_size, cfg.data.num_workers
        result = evaluate(self.model, self.eval_set, b, bs, workers, self.precision)
        record = {
            "epoch": self.step / self.plan.steps_per_epoch,
            "top1": result.top1,
            "top5": result.top5,
            "eval_samples": result.samples,
        }
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.eval_set, b, bs, workers, self.precision)
            record |= {"ema_top1": ema.top1, "ema_top5": ema.top5}
        best = max([*self.evals, record], key=lambda r: r["top1"])
        record |= {"best_top1": best["top1"], "best_epoch": best["epoch"]}
        self.evals.append({"step": self.step, **record})
        self.metrics.write(self.step, record)
        log.info(
            "step %d (epoch %.2f): top-1 %.2f%%, top-5 %.2f%%%s; best top-1 %.2f%% at epoch %.2f",
            self.step,
            record["epoch"],
            result.top1,
            result.top5,
            f", EMA top-1 {record['ema_top1']:.2f}%" if self.ema is not None else "",
            record["best_top1"],
            record["best_epoch"],
        )
        return record

    def finish(self, stopped: str, checkpoint: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "stopped": stopped, "checkpoint": checkpoint}
        if stopped != "preempted" and (not self.evals or self.evals[-1]["step"] != self.step):
            self.evaluate()  # the final weights, when the last epoch boundary did not just evaluate them
        if self.evals:
            last = self.evals[-1]
            out |= {k: v for k, v in last.items() if k != "step"}
        if self.backend.is_main:
            self.run_dir.write_json("finetune.json", out | {"evaluations": self.evals})
        return out
