"""Run the same D-iGPT work on several sides and compare them.

Every side starts from the same initial weights, sees the same batch and segment orders, and trains with the
trainer's own optimizer step (``digpt_xla.engine.step``: AdamW with the backend's options, the weight-decay
parameter groups of ``digpt pretrain``, the lr schedule, clipping and, for fp16, the loss scaler), built from the
config's ``optim`` and ``schedule`` sections as pretraining builds it. Teacher tokens are made once on the CPU
(``input.teacher`` random or pixel) or by an open_clip tower inside each side's step (``clip``: random weights from
the seed, run in the side's teacher precision). Each side runs a forward pass with every module's output recorded
(forward hooks, execution order), a backward pass, one optimizer step, and an independent N-step trajectory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from digpt_xla.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    load_dataclass,
    merge_values,
    parse_override,
)
from digpt_xla.config import validate as validate_config
from digpt_xla.engine.schedule import base_lr, cosine_lr, plan_steps
from digpt_xla.engine.step import OptimizerStep, build_adamw
from digpt_xla.models import DiGPT, digpt_config, set_attention
from digpt_xla.teacher import ClipTeacher, PixelTeacher

from .compare import diff, first_divergent, relative_error
from .sides import Side

log = logging.getLogger(__name__)
TUNABLE_SECTIONS = ("optim.", "schedule.")


@dataclass
class InputConfig:
    source: str = "random"  # random | digits (digits needs a 32 px model)
    teacher: str = "random"  # random | pixel | clip
    batch_size: int = 2
    clip_model: str = "ViT-B-16"  # input.teacher=clip: the open_clip image tower (random weights from `seed`)


@dataclass
class Tolerances:
    """Targets of a comparison; a None target is measured and shown but not judged."""

    loss_rel: float | None = 1e-6
    grad_cosine_min: float | None = 0.99999
    param_rel: float | None = 1e-6  # all parameters together, relative L2 after one optimizer step
    activation_rel_l2: float | None = 1e-5  # None: localisation is reported but is no pass/fail check
    trajectory_loss_rel: float | None = None  # None: the drift is measured and shown, not judged
    teacher_rel_l2: float | None = None  # input.teacher=clip: teacher tokens of the first batch


def _parity_schedule() -> ScheduleConfig:
    # One "epoch" is the trajectory: the lr starts at optim.lr and follows the cosine of the trajectory's steps.
    return ScheduleConfig(epochs=1.0, warmup_epochs=0.0)


@dataclass
class ParityConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    sides: list[str] = field(default_factory=lambda: ["cpu:fp32", "xla:fp32"])
    steps: int = 10  # trajectory length
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    schedule: ScheduleConfig = field(default_factory=_parity_schedule)
    seed: int = 0
    # Applied to every side after the first, to check that the harness catches it: "module.attr=value" changes a
    # module of the student (blocks.1.norm1.eps=1e-3); "optim.key=value" / "schedule.key=value" that side's
    # optimizer or lr schedule (optim.eps=1e-3).
    perturb: str = ""
    tolerances: Tolerances = field(default_factory=Tolerances)


def load_parity_config(path, overrides=()) -> ParityConfig:
    cfg = load_dataclass(ParityConfig(), path, overrides)
    validate_config(cfg.optim, "optim.")
    validate_config(cfg.schedule, "schedule.")
    if cfg.steps < 1 or cfg.input.batch_size < 1:
        raise ConfigError(f"steps={cfg.steps} and input.batch_size={cfg.input.batch_size} must be >= 1")
    for key, value, choices in (
        ("input.source", cfg.input.source, ("random", "digits")),
        ("input.teacher", cfg.input.teacher, ("random", "pixel", "clip")),
    ):
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    if cfg.perturb.startswith(TUNABLE_SECTIONS):
        side_sections(cfg, perturb=True)  # a bad key fails now, naming it
    for f in dataclasses.fields(Tolerances):
        value = getattr(cfg.tolerances, f.name)
        low, high = (-1.0, 1.0) if f.name == "grad_cosine_min" else (0.0, math.inf)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(
                f"tolerances.{f.name}={value}: must be a finite number in [{low:g}, {high:g}], or null to measure it "
                "without judging"
            )
    return cfg


@dataclass
class _Sections:
    optim: OptimConfig
    schedule: ScheduleConfig


def side_sections(cfg: ParityConfig, perturb: bool) -> tuple[OptimConfig, ScheduleConfig]:
    """The optimizer and schedule sections of one side: the config's, with an optim./schedule. perturbation."""
    sections = _Sections(copy.deepcopy(cfg.optim), copy.deepcopy(cfg.schedule))
    if perturb and cfg.perturb.startswith(TUNABLE_SECTIONS):
        merge_values(sections, parse_override(cfg.perturb), "perturb: ")
        validate_config(sections, "perturb: ")
    return sections.optim, sections.schedule


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
    """The open_clip tower of ``input.clip_model`` with random weights drawn from ``seed`` (no download)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return ClipTeacher(cfg.input.clip_model)


def make_inputs(cfg: ParityConfig, mc) -> Inputs:
    """The batch, orders and (CPU-made) teacher tokens of the single-step checks and of every trajectory step."""
    g = torch.Generator().manual_seed(cfg.seed)
    pixel = PixelTeacher(mc.patch_size, mc.img_size) if cfg.input.teacher == "pixel" else None
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
        self.backend.check_attention(cfg.model.resolve_attention())
        model = DiGPT(model_cfg)
        model.load_state_dict(initial, strict=True)
        set_attention(model, cfg.model.resolve_attention())
        if perturb and cfg.perturb and not cfg.perturb.startswith(TUNABLE_SECTIONS):
            apply_perturbation(model, cfg.perturb)
        self.model = model.to(self.backend.device)
        self.teacher = None
        if teacher_state is not None:
            teacher = build_clip_teacher(cfg)
            teacher.load_state_dict(teacher_state, strict=True)
            self.teacher = teacher.to(self.backend.device)
        optim, schedule = side_sections(cfg, perturb)
        batch = cfg.input.batch_size
        peak = base_lr(optim, batch)
        plan = plan_steps(schedule, cfg.steps * batch, batch, 1)
        self.lrs = [cosine_lr(i, plan.total_steps, plan.warmup_steps, peak, optim.min_lr) for i in range(cfg.steps)]
        groups = param_groups_weight_decay(self.model, optim.weight_decay)
        self.step = OptimizerStep(
            build_adamw(groups, optim, self.backend, peak), self.backend, side.autocast_precision, optim.clip_grad
        )

    def loss(self, images: Tensor, tokens: Tensor | None, order: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(teacher tokens, ar_loss, kd_loss) on the side's device and in its numeric setting."""
        images, tokens, order = self.backend.move((images, tokens, order))
        if self.teacher is not None:
            with self.side.numerics(self.side.teacher_precision):
                tokens = self.teacher(images).float()
        with self.side.numerics():
            out = self.model(images, tokens, order)
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
    from tqdm import tqdm

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


def compare_sides(ref: SideResult, cand: SideResult, initial: dict[str, Tensor], tol: Tolerances) -> dict[str, Any]:
    if ref.activation_names != cand.activation_names:
        raise RuntimeError(f"{ref.side} and {cand.side} ran different module sequences")
    act = [diff(a, b) for a, b in zip(ref.activations, cand.activations, strict=True)]
    loc_tol = tol.activation_rel_l2 if tol.activation_rel_l2 is not None else 1e-5
    first = first_divergent(ref.activation_names, act, loc_tol)
    grads = {n: diff(g, cand.grads[n]) for n, g in ref.grads.items()}
    params = {n: diff(p, cand.params_after_step[n]) for n, p in ref.params_after_step.items()}

    def flat(d):
        return torch.cat([v.flatten() for v in d.values()])

    final_ref, final_cand, start = (
        flat(ref.final_params),
        flat(cand.final_params),
        flat({n: initial[n] for n in ref.final_params}),
    )
    # All parameters together: a per-parameter ratio is ill-conditioned for zero-initialised ones (biases) whose
    # gradient is analytically zero (attention key biases): Adam's g / (|g| + eps) turns rounding noise into a
    # full-size step there. The per-parameter figures are reported all the same.
    step_global = diff(flat(ref.params_after_step), flat(cand.params_after_step))
    worst_params = sorted(params.items(), key=lambda kv: -kv[1].rel_l2 if kv[1].rel_l2 == kv[1].rel_l2 else -1e300)
    distance = (final_ref - final_cand).norm().item()
    steps = [
        {"step": i + 1, "ref": a, "cand": b, "abs": abs(a - b), "rel": relative_error(a, b)}
        for i, (a, b) in enumerate(zip(ref.trajectory_losses, cand.trajectory_losses, strict=True))
    ]
    losses = {
        "ar_loss": {"ref": ref.ar_loss, "cand": cand.ar_loss, "rel": relative_error(ref.ar_loss, cand.ar_loss)},
        "kd_loss": {"ref": ref.kd_loss, "cand": cand.kd_loss, "rel": relative_error(ref.kd_loss, cand.kd_loss)},
    }
    worst_grads = sorted(grads.items(), key=lambda kv: -kv[1].rel_l2 if kv[1].rel_l2 == kv[1].rel_l2 else -1e300)
    checks = [
        _check("ar_loss relative error", losses["ar_loss"]["rel"], tol.loss_rel, "<="),
        _check("kd_loss relative error", losses["kd_loss"]["rel"], tol.loss_rel, "<="),
        _check("min gradient cosine", min(d.cosine for d in grads.values()), tol.grad_cosine_min, ">="),
        _check("parameters after one step, rel. L2 error", step_global.rel_l2, tol.param_rel, "<="),
    ]
    worst_act = max((d.rel_l2 for d in act), default=0.0)
    checks.append(_check("max module-output rel. L2 error", worst_act, tol.activation_rel_l2, "<="))
    checks.append(_check("max trajectory loss rel. error", max(s["rel"] for s in steps), tol.trajectory_loss_rel, "<="))
    teacher = None
    if ref.teacher_tokens is not None and cand.teacher_tokens is not None:
        token_cos = torch.nn.functional.cosine_similarity(
            ref.teacher_tokens.double(), cand.teacher_tokens.double(), dim=-1
        )
        teacher = diff(ref.teacher_tokens, cand.teacher_tokens).as_dict() | {
            "min_token_cosine": token_cos.min().item(),
            "mean_token_cosine": token_cos.mean().item(),
        }
        checks.insert(0, _check("teacher tokens rel. L2 error", teacher["rel_l2"], tol.teacher_rel_l2, "<="))
    optimizer_differences = [
        {"setting": k, "ref": ref.optimizer[k], "cand": cand.optimizer.get(k)}
        for k in ref.optimizer
        if ref.optimizer[k] != cand.optimizer.get(k)
    ]
    lr_steps = [i + 1 for i, (a, b) in enumerate(zip(ref.lrs, cand.lrs, strict=True)) if a != b]
    if lr_steps:
        first = lr_steps[0] - 1
        optimizer_differences.append(
            {"setting": "lr", "ref": ref.lrs[first], "cand": cand.lrs[first], "steps": lr_steps}
        )
    return {
        "teacher_tokens": teacher,
        "optimizer_differences": optimizer_differences,
        "reference": ref.side,
        "candidate": cand.side,
        "passed": all(c["ok"] is not False for c in checks),
        "checks": checks,
        "losses": losses,
        "first_divergent": None
        if first is None
        else {"index": first, "module": ref.activation_names[first], **act[first].as_dict(), "tolerance": loc_tol},
        "activations": [{"module": n, **d.as_dict()} for n, d in zip(ref.activation_names, act, strict=True)],
        "grads": {n: d.as_dict() for n, d in grads.items()},
        "worst_grads": [{"param": n, **d.as_dict()} for n, d in worst_grads[:10]],
        "params_after_step": {n: d.as_dict() for n, d in params.items()},
        "params_after_step_global": step_global.as_dict(),
        "worst_params_after_step": [{"param": n, **d.as_dict()} for n, d in worst_params[:5]],
        "trajectory": {
            "steps": steps,
            "final_param_distance": distance,
            "final_param_rel_distance": distance / max(final_ref.norm().item(), 1e-30),
            "distance_over_movement": distance / max((final_ref - start).norm().item(), 1e-30),
        },
    }


def _check(name: str, value: float, tolerance: float | None, op: str) -> dict[str, Any]:
    """ok is None for a measurement without a target."""
    if tolerance is None:
        return {"check": name, "value": value, "op": op, "tolerance": None, "ok": None}
    ok = value <= tolerance if op == "<=" else value >= tolerance
    return {"check": name, "value": value, "op": op, "tolerance": tolerance, "ok": bool(ok)}


def run_parity(cfg: ParityConfig) -> dict[str, Any]:
    """Run every side, compare each with the first; returns the report dictionary."""
    sides = [Side.parse(s) for s in cfg.sides]
    if len(sides) < 2:
        raise ValueError("parity needs at least two sides")
    for side in sides:  # before any backward: autograd sizes its per-device queues at its first run
        side.backend_object()
    teacher_state = None
    overrides = cfg.model.shape_overrides()
    if cfg.input.teacher == "clip":
        teacher = build_clip_teacher(cfg)
        teacher_state = copy.deepcopy(teacher.state_dict())
        overrides |= {"teacher_grid": teacher.grid_size, "teacher_dim": teacher.dim}
        del teacher
    torch.manual_seed(cfg.seed)
    model_cfg = digpt_config(cfg.model.name, **overrides)
    model = DiGPT(model_cfg)
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
