"""Parity reports: ``report.json`` (everything), ``report.md`` (verdict, tables), PNG plots."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from typing import Any

import torch


def environment() -> dict[str, str]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    # The installed version, without starting torch_xla's runtime in a process that may not use it.
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        env["torch_xla"] = importlib.metadata.version("torch_xla")
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    env["cpu"] = f"{cpu or platform.processor()} ({os.cpu_count()} cores)"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _fmt(x: float) -> str:
    if isinstance(x, float) and 0.999 <= abs(x) < 1:
        return f"{x:.8f}"  # cosines: 0.99994 must not print as 1
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _target(check: dict[str, Any]) -> tuple[str, str]:
    if check["tolerance"] is None:
        return "measured", "-"
    return f"{check['op']} {_fmt(check['tolerance'])}", "yes" if check["ok"] else "NO"


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")


def optimizer_table(sides: list[dict[str, Any]]) -> list[str]:
    """What each side's optimizer step ran: the trainer's AdamW options, loss scaling, clipping, and the lr of
    the compared steps (the one-step check uses step 1's)."""
    if not sides or "optimizer" not in sides[0]:
        return []
    keys = ["fused", "capturable", "foreach", "betas", "eps", "weight_decay", "clip_grad", "grad_scaler"]
    lines = ["| side | " + " | ".join(keys) + " | lr at steps 1, 2, ..., last |", "|---" * (len(keys) + 2) + "|"]
    for s in sides:
        lrs = s["lrs"]
        shown = ", ".join(f"{v:.3g}" for v in lrs[:3]) + (f", ..., {lrs[-1]:.3g}" if len(lrs) > 3 else "")
        lines.append(f"| `{s['side']}` | " + " | ".join(str(s["optimizer"].get(k)) for k in keys) + f" | {shown} |")
    return [*lines, ""]


def render_markdown(report: dict[str, Any], title: str) -> str:
    lines = [f"# Parity: {title}", ""]
    judged = [c for comp in report["comparisons"] for c in comp["checks"] if c["ok"] is not None]
    verdict = ("PASS" if report["passed"] else "FAIL") if judged else "MEASURED (no targets set)"
    env = report["environment"]
    lines += [
        f"**Verdict: {verdict}**. Model `{report['model']}` ({report['trainable_params'] / 1e6:.1f} M trainable),"
        f" teacher {report.get('teacher', report['config']['input']['teacher'])},"
        f" batch {report['config']['input']['batch_size']}, {report['config']['steps']}-step trajectory, "
        f"seed {report['config']['seed']}. Every side trains with the trainer's optimizer step (AdamW, the weight-decay"
        " groups, the lr schedule, clipping and loss scaling as configured; per side below).",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "| side | device | seconds |",
        "|---|---|---|",
        *[f"| `{s['side']}` | {s['device']} | {s['seconds']:.1f} |" for s in report["sides"]],
        "",
        *optimizer_table(report["sides"]),
    ]
    for comp in report["comparisons"]:
        lines += [
            f"## `{comp['candidate']}` against `{comp['reference']}`",
            "",
            "| check | value | target | ok |",
            "|---|---|---|---|",
        ]
        lines += [f"| {c['check']} | {_fmt(c['value'])} | {' | '.join(_target(c))} |" for c in comp["checks"]]
        if comp.get("optimizer_differences"):
            shown = "; ".join(
                f"{d['setting']} {d['ref']} vs {d['cand']}" + (f" (steps {_steps(d['steps'])})" if "steps" in d else "")
                for d in comp["optimizer_differences"]
            )
            lines += ["", f"Optimizer settings differ from the reference: {shown}."]
        if comp.get("teacher_tokens"):
            t = comp["teacher_tokens"]
            lines += [
                "",
                "| teacher tokens (first batch) | max abs | rel. L2 | cosine | min token cosine |",
                "|---|---|---|---|---|",
                f"| `{comp['candidate']}` vs `{comp['reference']}` | {_fmt(t['max_abs'])} | "
                f"{_fmt(t['rel_l2'])} | {t['cosine']:.8f} | {t['min_token_cosine']:.8f} |",
            ]
        losses = comp["losses"]
        lines += ["", "| loss | reference | candidate | rel. error |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['ref']:.8f} | {v['cand']:.8f} | {_fmt(v['rel'])} |" for k, v in losses.items()]
        fd = comp["first_divergent"]
        lines += ["", "### Localisation", ""]
        if fd is None:
            lines.append("Every module output is within tolerance.")
        else:
            lines.append(
                f"First module over tolerance (rel. L2 > {_fmt(fd['tolerance'])}), in execution order: "
                f"`{fd['module']}` (call #{fd['index']}), rel. L2 {_fmt(fd['rel_l2'])}, "
                f"max abs {_fmt(fd['max_abs'])}."
            )
        acts = comp["activations"]
        rows = sorted({0, len(acts) - 1, *(range(0, len(acts), max(1, len(acts) // 12)))})
        if fd is not None:
            rows = sorted(set(rows) | {fd["index"]})
        lines += ["", "| # | module | max abs | rel. L2 | cosine |", "|---|---|---|---|---|"]
        lines += [
            f"| {i} | `{acts[i]['module']}` | {_fmt(acts[i]['max_abs'])} | {_fmt(acts[i]['rel_l2'])} | "
            f"{acts[i]['cosine']:.8f} |"
            for i in rows
        ]
        lines += [
            "",
            "### Worst 10 gradients (rel. L2)",
            "",
            "| parameter | max abs | rel. L2 | cosine |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{g['param']}` | {_fmt(g['max_abs'])} | {_fmt(g['rel_l2'])} | {g['cosine']:.8f} |"
            for g in comp["worst_grads"]
        ]
        lines += [
            "",
            "### Parameters after one AdamW step: worst 5 individually",
            "",
            "Zero-initialised parameters with an analytically zero gradient (attention key biases) take a "
            "step of Adam's sign of rounding noise, so individual relative errors there say little; the "
            "check above uses all parameters together.",
            "",
            "| parameter | max abs | rel. L2 |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{p['param']}` | {_fmt(p['max_abs'])} | {_fmt(p['rel_l2'])} |" for p in comp["worst_params_after_step"]
        ]
        traj = comp["trajectory"]
        steps = traj["steps"]
        pick = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 10))})
        lines += [
            "",
            "### Loss drift over the trajectory",
            "",
            "| step | reference | candidate | rel. error |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {steps[i]['step']} | {steps[i]['ref']:.6f} | {steps[i]['cand']:.6f} | {_fmt(steps[i]['rel'])} |"
            for i in pick
        ]
        lines += [
            "",
            f"Parameters after {len(steps)} steps: distance {_fmt(traj['final_param_distance'])}, "
            f"{_fmt(traj['final_param_rel_distance'])} of their norm, "
            f"{_fmt(traj['distance_over_movement'])} of the distance they moved from the start.",
            "",
        ]
    return "\n".join(lines)


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def plot(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes by file name: per-module error and loss drift of each comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}
    for k, comp in enumerate(report["comparisons"]):
        suffix = "" if len(report["comparisons"]) == 1 else f"_{k + 1}"
        fig, ax = plt.subplots(figsize=(8, 3.5))
        rel = [max(a["rel_l2"], 1e-12) for a in comp["activations"]]
        ax.semilogy(rel, lw=1)
        if comp["first_divergent"] is not None:
            ax.axvline(comp["first_divergent"]["index"], color="r", ls="--", lw=1, label="first over tolerance")
            ax.legend()
        ax.set_xlabel("module call (execution order)")
        ax.set_ylabel("rel. L2 error of output")
        ax.set_title(f"{comp['candidate']} vs {comp['reference']}: per-module error")
        fig.tight_layout()
        pngs[f"layer_error{suffix}.png"] = _png(fig)

        steps = comp["trajectory"]["steps"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
        xs = [s["step"] for s in steps]
        a1.plot(xs, [s["ref"] for s in steps], label=comp["reference"])
        a1.plot(xs, [s["cand"] for s in steps], "--", label=comp["candidate"])
        a1.set_xlabel("step")
        a1.set_ylabel("loss")
        a1.legend()
        a2.semilogy(xs, [max(s["rel"], 1e-12) for s in steps])
        a2.set_xlabel("step")
        a2.set_ylabel("loss rel. difference")
        fig.suptitle("loss drift")
        fig.tight_layout()
        pngs[f"loss_drift{suffix}.png"] = _png(fig)
    return pngs


def write_report(report: dict[str, Any], out_dir: str, title: str) -> dict[str, str]:
    """report.json, report.md and the plots into ``out_dir`` (a local path or any fsspec URL); their URLs by kind."""
    from digpt_xla.rundir import RunDir

    out = RunDir(out_dir)
    report = {**report, "environment": report.get("environment") or environment()}
    files = {
        "json": out.write_json("report.json", report),
        "md": out.write_text("report.md", render_markdown(report, title)),
    }
    for i, (name, png) in enumerate(plot(report).items()):
        files[f"png{i}"] = out.write_bytes(name, png)
    return files
