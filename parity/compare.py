"""Comparing two sides: error measures between a reference tensor and a candidate, the first divergent module,
and the checks of one side against the reference."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import Tolerances
    from .side_run import SideResult


@dataclass
class TensorDiff:
    max_abs: float
    rel_l2: float  # ||a - b|| / ||a||
    cosine: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def diff(reference: Tensor, candidate: Tensor, chunk: int = 1 << 22) -> TensorDiff:
    """Errors of ``candidate`` against ``reference``, accumulated in float64 over chunks (so comparing all of
    ViT-B's parameters at once needs no float64 copy of them)."""
    a_all, b_all = reference.detach().flatten(), candidate.detach().flatten()
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    sq_a = sq_b = sq_d = dot = max_abs = 0.0
    for start in range(0, a_all.numel(), chunk):
        a, b = a_all[start : start + chunk].double(), b_all[start : start + chunk].double()
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(fa, fb):
            return TensorDiff(math.inf, math.inf, -1.0)
        a, b = a[fa], b[fa]
        delta = a - b
        sq_a, sq_b, sq_d = sq_a + (a @ a).item(), sq_b + (b @ b).item(), sq_d + (delta @ delta).item()
        dot += (a @ b).item()
        if delta.numel():
            max_abs = max(max_abs, delta.abs().max().item())
    norm_a, norm_d = math.sqrt(sq_a), math.sqrt(sq_d)
    rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
    denom = norm_a * math.sqrt(sq_b)
    cosine = dot / denom if denom > 0 else (1.0 if rel == 0 else 0.0)
    return TensorDiff(max_abs, rel, cosine)


def relative_error(reference: float, candidate: float) -> float:
    if reference == candidate:
        return 0.0
    return abs(reference - candidate) / abs(reference) if reference != 0 else math.inf


def first_divergent(names: list[str], diffs: list[TensorDiff], rel_l2_tolerance: float) -> int | None:
    """Index (execution order) of the first module output whose relative L2 error exceeds the tolerance."""
    for i, d in enumerate(diffs):
        if not d.rel_l2 <= rel_l2_tolerance:  # also catches NaN
            return i
    return None


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
