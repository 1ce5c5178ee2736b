"""``digpt probe``: features of a pretrained (or freshly initialised) encoder, then kNN and a linear probe."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..backend import Backend, create_backend
from ..checkpoint.reader import load_model_state, read_state_dict
from ..config import Config
from ..data import probe_datasets
from ..rundir import RunDir
from .build import build_student
from .knn import extract_features, knn_classify
from .probe import linear_probe

log = logging.getLogger(__name__)


def run_probe(cfg: Config, backend: Backend | None = None) -> dict[str, Any]:
    """Features on ``backend`` (default: the one ``backend.*`` names), in fp32; kNN and the linear probe on the
    host."""
    p = cfg.probe
    out = RunDir(cfg.run.out_dir)
    out.check_writable("run.out_dir")  # before minutes of features and probes
    torch.manual_seed(cfg.run.seed)  # without a checkpoint: the same initial encoder pretraining starts from
    model = build_student(cfg.model)
    if p.checkpoint:
        load_model_state(model, read_state_dict(p.checkpoint), p.checkpoint)
    b = backend or create_backend(cfg.backend.name, cfg.backend.compile_cache)
    model.to(b.device)
    train_set, val_set = probe_datasets(cfg, model.cfg.img_size)
    train_x, train_y = extract_features(model, train_set, p.batch_size, cfg.data.num_workers)
    val_x, val_y = extract_features(model, val_set, p.batch_size, cfg.data.num_workers)
    result: dict[str, Any] = {
        "checkpoint": p.checkpoint or "(random init)",
        "model": cfg.model.name,
        "features_on": b.name,
        "train_samples": len(train_y),
        "val_samples": len(val_y),
    }
    if p.kind in ("knn", "both"):
        pred = knn_classify(train_x, train_y, val_x, p.k, p.temperature)
        result["knn_top1"] = 100.0 * (pred == val_y).float().mean().item()
    if p.kind in ("linear", "both"):
        result["linear_top1"] = linear_probe(
            train_x, train_y, val_x, val_y, epochs=p.epochs, lr=p.lr, weight_decay=p.weight_decay, seed=cfg.run.seed
        )
    result["output"] = out.write_json("probe.json", result)
    return result
