"""Run the same D-iGPT work on several sides and compare them.

Every side starts from the same initial weights, sees the same batch and segment orders, and trains with the
trainer's own optimizer step (``digpt_xla.engine.step``: AdamW with the backend's options, the weight-decay
parameter groups of ``digpt pretrain``, the lr schedule, clipping and, for fp16, the loss scaler), built from the
config's ``optim`` and ``schedule`` sections as pretraining builds it. Teacher tokens are made once on the CPU
(``input.teacher`` random or pixel) or by an open_clip tower inside each side's step (``clip``: random weights from
the seed, run in the side's teacher precision). ``config``: what runs; ``side_run``: one side; ``compare``: one side
against the reference.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from digpt_xla.engine.build import build_student, student_config

from .compare import compare_sides
from .config import ParityConfig, load_parity_config
from .side_run import build_clip_teacher, make_inputs, run_side
from .sides import Side

__all__ = ["ParityConfig", "load_parity_config", "run_parity"]


def run_parity(cfg: ParityConfig) -> dict[str, Any]:
    """Run every side, compare each with the first; returns the report dictionary."""
    sides = [Side.parse(s) for s in cfg.sides]
    if len(sides) < 2:
        raise ValueError("parity needs at least two sides")
    for side in sides:  # before any backward: autograd sizes its per-device queues at its first run
        side.backend_object()
    teacher, teacher_state = None, None
    if cfg.input.teacher == "clip":
        teacher = build_clip_teacher(cfg)
        teacher_state = copy.deepcopy(teacher.state_dict())
    model_cfg = student_config(cfg.model, teacher)
    del teacher
    torch.manual_seed(cfg.seed)
    model = build_student(cfg.model, model_cfg)
    initial = copy.deepcopy(model.state_dict())
    inputs = make_inputs(cfg, model_cfg)
    init_params = {n: p.detach().float() for n, p in model.named_parameters()}
    results = [run_side(cfg, sides[0], model_cfg, initial, teacher_state, inputs, perturb=False)]
    comparisons = []
    for side in sides[1:]:  # compared as it finishes, then only its figures are kept (ViT-B: GBs per side)
        result = run_side(cfg, side, model_cfg, initial, teacher_state, inputs, perturb=True)
        comparisons.append(compare_sides(results[0], result, init_params, cfg.tolerances))
        results.append(result.summary())
    return {
        "model": cfg.model.name,
        "trainable_params": model.num_trainable_params(),
        "teacher": cfg.input.teacher if cfg.input.teacher != "clip" else f"clip {cfg.input.clip_model}",
        "sides": [
            {"side": r.side, "device": r.device, "seconds": r.seconds, "optimizer": r.optimizer, "lrs": r.lrs}
            for r in results
        ],
        "comparisons": comparisons,
        "passed": all(c["passed"] for c in comparisons),
    }
