"""One side of a comparison: the student, teacher and optimizer step built as ``digpt pretrain`` builds them, run
on the side's backend and numerics; its forward recorded module by module, one step inspected, then a trajectory."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from digpt_xla.config import TeacherConfig
from digpt_xla.engine.build import build_student, build_teacher, distill_forward
from digpt_xla.engine.schedule import base_lr, cosine_lr, plan_steps
from digpt_xla.engine.step import OptimizerStep, build_adamw
from digpt_xla.teacher import ClipTeacher

from .config import TUNABLE_SECTIONS, ParityConfig, side_sections
from .sides import Side

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    images: Tensor
    teacher_tokens: Tensor | None  # None: the side's CLIP teacher makes them
    order: Tensor
    trajectory: list[tuple[Tensor, Tensor | None, Tensor]]


@dataclass
class SideResult:
    side: str
    device: str
    ar_loss: float
    kd_loss: float
    activation_names: list[str]
    activations: list[Tensor]
    grads: dict[str, Tensor]
    params_after_step: dict[str, Tensor]
    trajectory_losses: list[float]
    final_params: dict[str, Tensor]
    seconds: float
    optimizer: dict[str, Any]
    lrs: list[float]
    teacher_tokens: Tensor | None

    def summary(self) -> SideResult:
        """The same result without its tensors (what the report's side table needs)."""
        return dataclasses.replace(
            self, activations=[], grads={}, params_after_step={}, final_params={}, teacher_tokens=None
        )


def build_clip_teacher(cfg: ParityConfig) -> ClipTeacher:
    """The open_clip tower of ``input.clip_model`` with random weights drawn from ``seed`` (no download), built as
    pretraining builds its teacher."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return cast(ClipTeacher, build_teacher(TeacherConfig(kind="clip", clip_model=cfg.input.clip_model)))


def make_inputs(cfg: ParityConfig, mc) -> Inputs:
    """The batch, orders and (CPU-made) teacher tokens of the single-step checks and of every trajectory step."""
    g = torch.Generator().manual_seed(cfg.seed)
    pixel = build_teacher(TeacherConfig(kind="pixel"), mc) if cfg.input.teacher == "pixel" else None
    if pixel is not None and (pixel.grid_size, pixel.dim) != (mc.teacher_grid, mc.teacher_dim):
        raise ValueError(
            f"input.teacher=pixel gives {pixel.grid_size}^2 x {pixel.dim} tokens; the model expects "
            f"{mc.teacher_grid}^2 x {mc.teacher_dim}"
        )
    digits = None
    if cfg.input.source == "digits":
        from digpt_xla.data.digits import load_digits_images, normalize

        digits = normalize(load_digits_images(mc.img_size)[0])

    def batch() -> tuple[Tensor, Tensor | None, Tensor]:
        B = cfg.input.batch_size
        if digits is not None:
            images = digits[torch.randint(0, len(digits), (B,), generator=g)]
        else:
            images = torch.randn(B, mc.in_chans, mc.img_size, mc.img_size, generator=g)
        if pixel is not None:
            tokens = pixel(images)
        elif cfg.input.teacher == "random":
            tokens = torch.randn(B, 1 + mc.teacher_grid**2, mc.teacher_dim, generator=g)
        else:
            tokens = None
        order = torch.stack([torch.randperm(mc.num_segments, generator=g) for _ in range(B)])
        return images, tokens, order

    first = batch()
    return Inputs(*first, trajectory=[first] + [batch() for _ in range(cfg.steps - 1)])


def apply_perturbation(model: nn.Module, spec: str) -> None:
    """``blocks.1.norm1.eps=1e-3``: set an attribute of one module (to check the harness finds it)."""
    target, _, value = spec.partition("=")
    module_name, _, attr = target.rpartition(".")
    module = model.get_submodule(module_name)
    if not hasattr(module, attr):
        raise ValueError(f"perturb: {module_name} has no attribute {attr!r}")
    old = getattr(module, attr)
    setattr(module, attr, type(old)(value))


def _record_outputs(model: nn.Module) -> tuple[list[str], list[Tensor], list[Any]]:
    names: list[str] = []
    outputs: list[Tensor] = []
    calls: dict[str, int] = {}

    def hook(name):
        def fn(module, args, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, Tensor):
                k = calls.get(name, 0)
                calls[name] = k + 1
                names.append(name if k == 0 else f"{name}#{k}")
                outputs.append(t.detach())

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    return names, outputs, handles


def _cpu_float(t: Tensor) -> Tensor:
    return t.detach().float().cpu()


class _SideTrainer:
    """One side's student, teacher and optimizer step, built as ``digpt pretrain`` builds them."""

    def __init__(
        self,
        cfg: ParityConfig,
        side: Side,
        model_cfg,
        initial: dict[str, Tensor],
        teacher_state: dict[str, Tensor] | None,
        perturb: bool,
    ) -> None:
        self.side, self.backend = side, side.backend_object()
        self.backend.check_attention(cfg.model.attention)
        model = build_student(cfg.model, model_cfg, initial)
        if perturb and cfg.perturb and not cfg.perturb.startswith(TUNABLE_SECTIONS):
            apply_perturbation(model, cfg.perturb)
        self.model = model.to(self.backend.device)
        self.teacher = None
        if teacher_state is not None:
            teacher = build_clip_teacher(cfg)
            teacher.load_state_dict(teacher_state, strict=True)
            # Placed as pretraining places it: whole on the device, stored in the side's teacher precision.
            self.teacher = self.backend.prepare_frozen(teacher, precision=side.teacher_precision)
        optim, schedule = side_sections(cfg, perturb)
        batch = cfg.input.batch_size
        peak = base_lr(optim, batch)
        plan = plan_steps(schedule, cfg.steps * batch, batch, 1)
        self.lrs = [cosine_lr(i, plan.total_steps, plan.warmup_steps, peak, optim.min_lr) for i in range(cfg.steps)]
        groups = self.model.weight_decay_groups(optim.weight_decay)
        self.step = OptimizerStep(
            build_adamw(groups, optim, self.backend, peak), self.backend, side.autocast_precision, optim.clip_grad
        )

    def loss(self, images: Tensor, tokens: Tensor | None, order: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(teacher tokens, ar_loss, kd_loss) on the side's device and in its numeric setting."""
        images, tokens, order = self.backend.move((images, tokens, order))
        side = self.side
        tokens, out = distill_forward(
            self.model,
            self.teacher,
            images,
            tokens,
            order,
            side.numerics,
            side.autocast_precision,
            side.teacher_precision,
        )
        return tokens, out.ar_loss, out.kd_loss


def run_side(
    cfg: ParityConfig, side: Side, model_cfg, initial_state, teacher_state, inputs: Inputs, perturb: bool
) -> SideResult:
    t0 = time.perf_counter()
    backend = side.backend_object()
    run = _SideTrainer(cfg, side, model_cfg, initial_state, teacher_state, perturb)
    names, outputs, handles = _record_outputs(run.model)
    tokens, ar, kd = run.loss(inputs.images, inputs.teacher_tokens, inputs.order)
    run.step.backward(ar + kd)
    seen: dict[str, Any] = {}

    def inspect() -> None:  # gradients reduced and unscaled, before clipping and the update
        backend.mark_step()
        seen["grads"] = {n: _cpu_float(p.grad) for n, p in run.model.named_parameters() if p.grad is not None}

    run.step.step(run.lrs[0], inspect=inspect)
    backend.mark_step()
    for h in handles:
        h.remove()
    activations = [_cpu_float(t) for t in outputs]
    teacher_tokens = _cpu_float(tokens) if run.teacher is not None else None
    ar_loss, kd_loss = float(ar.detach()), float(kd.detach())
    params_after = {n: _cpu_float(p) for n, p in run.model.named_parameters() if p.requires_grad}
    del run, outputs, tokens, ar, kd  # one side's student, teacher and optimizer in memory at a time

    # The trajectory starts again from the initial weights, with its own optimizer.
    run = _SideTrainer(cfg, side, model_cfg, initial_state, teacher_state, perturb)
    losses = []
    for i, batch in enumerate(tqdm(inputs.trajectory, desc=f"{side} trajectory", unit="step", leave=False)):
        _, ar, kd = run.loss(*batch)
        run.step.backward(ar + kd)
        run.step.step(run.lrs[i])
        losses.append((ar + kd).detach())
        backend.mark_step()  # losses stay on the device: no host read inside the trajectory
    final = {n: _cpu_float(p) for n, p in run.model.named_parameters() if p.requires_grad}
    seconds = time.perf_counter() - t0
    log.info("side %s done in %.1fs", side, seconds)
    return SideResult(
        str(side),
        str(backend.device),
        ar_loss,
        kd_loss,
        names,
        activations,
        seen["grads"],
        params_after,
        [float(v) for v in losses],
        final,
        seconds,
        run.step.settings(),
        run.lrs,
        teacher_tokens,
    )
