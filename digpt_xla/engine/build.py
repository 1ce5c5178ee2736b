"""What pretraining is made of, built in one place: the teacher, the student sized to it, and their joint forward.

``Pretrainer``, the parity harness, the probe and the benchmarks all build through here, so that the student they
compare or measure is the one ``digpt pretrain`` trains.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, TeacherConfig
from ..models import DiGPT, digpt_config, random_segment_order, set_attention
from ..models.digpt import DiGPTConfig, DiGPTOutput
from ..teacher import ClipTeacher, PixelTeacher

Numerics = Callable[[str], AbstractContextManager[Any]]  # precision -> the context a forward pass runs in


def build_teacher(cfg: TeacherConfig, model_cfg: DiGPTConfig | None = None) -> nn.Module:
    """The frozen teacher: pixels of each patch (of ``model_cfg``'s patches), or an open_clip image tower (weights
    from ``cfg.checkpoint``; random without one)."""
    if cfg.kind == "pixel":
        if model_cfg is None:
            raise ValueError("teacher.kind=pixel takes its patches from the student's config")
        return PixelTeacher(model_cfg.patch_size, model_cfg.img_size)
    import open_clip

    if open_clip.get_model_config(cfg.clip_model) is None:
        close = [m for m in open_clip.list_models() if m.lower().startswith(cfg.clip_model.lower()[:5])]
        raise ConfigError(
            f"teacher.clip_model: {cfg.clip_model!r} is not an open_clip model "
            f"(e.g. {', '.join(close[:5]) or 'ViT-H-14, ViT-B-16'})"
        )
    return ClipTeacher(cfg.clip_model, cfg.checkpoint or None)


def student_config(model: ModelConfig, teacher: nn.Module | None = None) -> DiGPTConfig:
    """The student's shape: the named size with the ``model.*`` overrides, predicting ``teacher``'s tokens (its
    grid and width) when one is given."""
    overrides = model.shape_overrides()
    if teacher is not None:
        overrides |= {"teacher_grid": teacher.grid_size, "teacher_dim": teacher.dim}
    return digpt_config(model.name, **overrides)


def build_student(
    model: ModelConfig, shape: DiGPTConfig | None = None, state: dict[str, Tensor] | None = None
) -> DiGPT:
    """The student of ``shape`` (default: ``student_config(model)``) with ``model.attention``; ``state`` loaded
    strictly when given."""
    student = DiGPT(shape or student_config(model))
    if state is not None:
        student.load_state_dict(state, strict=True)
    set_attention(student, model.attention)
    return student


def build_model_and_teacher(model: ModelConfig, teacher: TeacherConfig) -> tuple[DiGPT, nn.Module]:
    """The teacher, and the student sized to predict its tokens."""
    built = build_teacher(teacher, student_config(model))
    return build_student(model, student_config(model, built)), built


def distill_forward(
    model: nn.Module,
    teacher: nn.Module | None,
    images: Tensor,
    targets: Tensor | None,
    order: Tensor,
    numerics: Numerics,
    precision: str,
    teacher_precision: str,
) -> tuple[Tensor, DiGPTOutput]:
    """One D-iGPT forward: the teacher's tokens of ``images`` (in ``teacher_precision``; or ``targets`` given
    ready-made when ``teacher`` is None), then the student (in ``precision``) predicting them in ``order``.
    Returns (targets in fp32, the student's output with ``ar_loss`` and ``kd_loss``)."""
    if teacher is not None:
        with numerics(teacher_precision):
            targets = teacher(images).float()
    if targets is None:
        raise ValueError("distill_forward needs a teacher or ready-made targets")
    with numerics(precision):
        out = model(images, targets, order)
    return targets, out


def segment_orders(seed: int, step: int, micro: int, global_batch: int, num_segments: int) -> Tensor:
    """(global_batch, S) orders for one micro-batch, a function of (seed, step, micro) only: identical on every
    backend and rank count, and reproduced exactly after a resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 131 + micro)
    return random_segment_order(global_batch, num_segments, "cpu", generator=g)
