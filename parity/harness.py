"""Run the same D-iGPT work on several sides and compare them.

Every side starts from the same initial weights, sees the same batch, the same segment orders and the same
teacher tokens (made once, on the CPU, in fp32) and runs: a forward pass with every module's output recorded
(forward hooks, execution order), a backward pass, one AdamW step, and an independent N-step trajectory.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from digpt_xla.config import ModelConfig, load_dataclass
from digpt_xla.models import DiGPT, digpt_config, set_fused_attention
from digpt_xla.teacher import PixelTeacher

from .compare import diff, first_divergent, relative_error
from .sides import Side

log = logging.getLogger(__name__)


@dataclass
class InputConfig:
    source: str = "random"  # random | digits (digits needs a 32 px model)
    teacher: str = "random"  # random | pixel
    batch_size: int = 2


@dataclass
class Tolerances:
    """Targets of a comparison; a None target is measured and shown but not judged."""

    loss_rel: float | None = 1e-6
    grad_cosine_min: float | None = 0.99999
    param_rel: float | None = 1e-6  # all parameters together, relative L2 after one optimizer step
    activation_rel_l2: float | None = 1e-5  # None: localisation is reported but is no pass/fail check
    trajectory_loss_rel: float | None = None  # None: the drift is measured and shown, not judged


@dataclass
class ParityConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    sides: list[str] = field(default_factory=lambda: ["cpu:fp32", "xla:fp32"])
    steps: int = 10  # trajectory length
    lr: float = 1e-4
    weight_decay: float = 0.05
    seed: int = 0
    perturb: str = ""  # "module.attr=value" applied to every side after the first (harness self-checks)
    tolerances: Tolerances = field(default_factory=Tolerances)


def load_parity_config(path, overrides=()) -> ParityConfig:
    return load_dataclass(ParityConfig(), path, overrides)


@dataclass
class Inputs:
    images: Tensor
    teacher_tokens: Tensor
    order: Tensor
    trajectory: list[tuple[Tensor, Tensor, Tensor]]


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


def make_inputs(cfg: ParityConfig, model: DiGPT) -> Inputs:
    """The batch, orders and teacher tokens of the single-step checks and of every trajectory step."""
    mc = model.cfg
    g = torch.Generator().manual_seed(cfg.seed)
    pixel = PixelTeacher(mc.patch_size, mc.img_size) if cfg.input.teacher == "pixel" else None
    if pixel is not None and (pixel.grid_size, pixel.dim) != (mc.teacher_grid, mc.teacher_dim):
        raise ValueError(f"input.teacher=pixel gives {pixel.grid_size}^2 x {pixel.dim} tokens; the model expects "
                         f"{mc.teacher_grid}^2 x {mc.teacher_dim}")  # fmt: skip
    digits = None
    if cfg.input.source == "digits":
        from digpt_xla.data.digits import load_digits_images, normalize

        digits = normalize(load_digits_images(mc.img_size)[0])

    def batch() -> tuple[Tensor, Tensor, Tensor]:
        B = cfg.input.batch_size
        if digits is not None:
            images = digits[torch.randint(0, len(digits), (B,), generator=g)]
        else:
            images = torch.randn(B, mc.in_chans, mc.img_size, mc.img_size, generator=g)
        if pixel is not None:
            tokens = pixel(images)
        else:
            tokens = torch.randn(B, 1 + mc.teacher_grid**2, mc.teacher_dim, generator=g)
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


def build_side_model(cfg: ParityConfig, model_cfg, initial_state, side: Side, perturb: bool) -> DiGPT:
    model = DiGPT(model_cfg)
    model.load_state_dict(initial_state, strict=True)
    set_fused_attention(model, cfg.model.fused_attention)
    if perturb and cfg.perturb:
        apply_perturbation(model, cfg.perturb)
    return model.to(side.backend_object().device)


def _optimizer(cfg: ParityConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))


def _backward(loss: Tensor, scaler, opt) -> None:
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)


def _step(scaler, opt) -> None:
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


def run_side(cfg: ParityConfig, side: Side, model_cfg, initial_state, inputs: Inputs, perturb: bool) -> SideResult:
    t0 = time.perf_counter()
    backend = side.backend_object()
    move = backend.move
    model = build_side_model(cfg, model_cfg, initial_state, side, perturb)
    opt = _optimizer(cfg, model)
    scaler = backend.grad_scaler(side.autocast_precision)

    names, outputs, handles = _record_outputs(model)
    images, tokens, order = move((inputs.images, inputs.teacher_tokens, inputs.order))
    with side.numerics():
        out = model(images, tokens, order)
    _backward(out.ar_loss + out.kd_loss, scaler, opt)
    backend.mark_step()
    for h in handles:
        h.remove()
    activations = [_cpu_float(t) for t in outputs]
    grads = {n: _cpu_float(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    ar_loss, kd_loss = float(out.ar_loss.detach()), float(out.kd_loss.detach())
    _step(scaler, opt)
    backend.mark_step()
    params_after = {n: _cpu_float(p) for n, p in model.named_parameters() if p.requires_grad}

    # The trajectory starts again from the initial weights, with its own optimizer.
    model = build_side_model(cfg, model_cfg, initial_state, side, perturb)
    opt = _optimizer(cfg, model)
    scaler = backend.grad_scaler(side.autocast_precision)
    losses = []
    from tqdm import tqdm

    for batch in tqdm(inputs.trajectory, desc=f"{side} trajectory", unit="step", leave=False):
        images, tokens, order = move(batch)
        with side.numerics():
            out = model(images, tokens, order)
        loss = out.ar_loss + out.kd_loss
        _backward(loss, scaler, opt)
        _step(scaler, opt)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        backend.mark_step()  # losses stay on the device: no host read inside the trajectory
    final = {n: _cpu_float(p) for n, p in model.named_parameters() if p.requires_grad}
    seconds = time.perf_counter() - t0
    log.info("side %s done in %.1fs", side, seconds)
    return SideResult(
        str(side), str(backend.device), ar_loss, kd_loss, names, activations, grads, params_after,
        [float(v) for v in losses], final, seconds,
    )  # fmt: skip


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
    checks.append(_check("max trajectory loss rel. error", max(s["rel"] for s in steps), tol.trajectory_loss_rel,
                         "<="))  # fmt: skip
    return {
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
    torch.manual_seed(cfg.seed)
    model_cfg = digpt_config(cfg.model.name, **cfg.model.shape_overrides())
    model = DiGPT(model_cfg)
    initial = copy.deepcopy(model.state_dict())
    inputs = make_inputs(cfg, model)
    results = [run_side(cfg, s, model_cfg, initial, inputs, perturb=i > 0) for i, s in enumerate(sides)]
    init_params = {n: p.detach().float() for n, p in model.named_parameters()}
    comparisons = [compare_sides(results[0], r, init_params, cfg.tolerances) for r in results[1:]]
    return {
        "model": cfg.model.name,
        "trainable_params": model.num_trainable_params(),
        "sides": [{"side": r.side, "device": r.device, "seconds": r.seconds} for r in results],
        "comparisons": comparisons,
        "passed": all(c["passed"] for c in comparisons),
    }
