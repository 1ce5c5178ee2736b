#!/usr/bin/env python
"""A TPU plan of the training step, compiled by libtpu on a machine without a TPU.

    python tools/tpu_plan.py --model digpt_vit_base_patch16_224 --topology v5e:2x2 --fsdp 4 --batch 8
    python tools/tpu_plan.py --model digpt_vit_huge_patch14_224 --topology v5e:4x4 --fsdp 16 --max-batch

The real ``Pretrainer`` step (the model's own teacher: CLIP ViT-H/14 with random weights for the ViT sizes; bf16;
FSDPv2 over ``--fsdp`` devices, data parallel over the rest) is traced by torch_xla on as many XLA:CPU devices as
the topology has, then compiled for it by libtpu from jax[tpu] in a separate interpreter (``make tpu-env``). Per
device: arguments, temporaries, outputs not aliased to an argument (the state the step updates in place is
donated, as torch_xla does), their total against the chip's HBM, libtpu's verdict on the fit, FLOPs and bytes
from its cost analysis, the compiled program's collectives, and a step time and MFU estimated from published
per-chip peaks. ``--max-batch`` finds the largest per-device batch that fits. Results: OUT/<topology>/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from digpt_xla.entry import run_entry
from digpt_xla.tpu_plan.plan import PlanRequest, assemble, describe, jax_python, max_batch, plan_step
from digpt_xla.tpu_plan.tables import GIB, TABLES, markdown, updated_docs

REPO = Path(__file__).resolve().parent.parent


def _progress(line: str) -> None:
    print(line, flush=True)


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C: the running child is killed and the temporary directory removed on the way out.
    raise SystemExit(128 + signum)


def table(plan: dict) -> str:
    """The plan as a few aligned lines."""
    head = f"{plan['step']} step of {plan['model']} on {plan['topology']} ({plan['devices']} x {plan['device_kind']})"
    head += f", fsdp={plan['fsdp']}"
    head += f", {plan['per_device_batch']} per device (global {plan['global_batch']}), compiled in "
    head += f"{plan['compile_seconds']:.0f}s by libtpu {plan['libtpu']}"
    stages = plan.get("compile_stages", {})
    if stages:  # where libtpu's time went, from its own log
        names = {"hlo_passes": "HLO passes", "backend_passes": "backend passes", "code_generation": "code generation"}
        head += " (" + ", ".join(f"{w} {stages[k]:.0f}s" for k, w in names.items() if k in stages) + ")"
    hbm = plan["hbm_bytes"] / GIB
    if not plan.get("compiled", True):
        need = plan["needed_bytes"] / GIB
        return f"{head}\n  does not fit: needs more than {need:.2f} GiB of {hbm:.2f} GiB per device (libtpu)"
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines = [
        head,
        f"  arguments {plan['argument_bytes'] / GIB:8.3f} GiB  (sharded state {plan['state_bytes'] / GIB:.3f}, "
        f"teacher {plan['teacher_bytes'] / GIB:.3f}, batch {plan['batch_bytes'] / GIB:.3f})",
        f"  temporaries {plan['temp_bytes'] / GIB:6.3f} GiB",
        f"  outputs not donated {plan['unaliased_output_bytes'] / GIB:.3f} GiB ({plan['donated_buffers']} donated)",
        f"  sum {plan['total_bytes'] / GIB:14.3f} GiB, libtpu's peak {plan['peak_bytes'] / GIB:.3f} GiB, of "
        f"{hbm:.2f} GiB HBM: {verdict} (by the {plan['fit_decided_by']})",
        f"  {plan['flops'] / 1e12:.3f} TFLOP per device-step with loops counted ({plan['flops_per_image'] / 1e9:.1f} "
        "GFLOP per image"
        + (f", {plan['flops_vs_analytic']:.3f} of digpt_xla.flops' count)" if plan.get("flops_vs_analytic") else ")"),
        f"  on the wire {plan['wire_bytes'] / 2**20:.1f} MiB per device-step; the FSDP minimum "
        f"{plan['fsdp_minimum']['bytes'] / 2**20:.1f} MiB",
        "  collectives (count, wire MiB): "
        + ", ".join(
            f"{k} {v['count']} ({v['wire_bytes'] / 2**20:.1f})" for k, v in plan["collectives"].items() if v["count"]
        ),
    ]
    for c in plan["largest_collectives"][:5]:
        lines.append(
            f"    {c['kind']} {c['shape']} over {c['group']} x{c['executions']}: "
            f"{c['wire_bytes_per_execution'] * c['executions'] / 2**20:.1f} MiB -> {c['consumer'] or c['torch_op']}"
        )
    est = plan.get("estimate")
    if est:
        low, high = est["images_per_second_per_chip"]
        lines.append(
            f"  estimate (not measured): fastest {est['fastest_step_seconds'] * 1e3:.1f} ms a step ({high:.0f} img/s "
            f"per chip, MFU {100 * est['mfu'][1]:.0f}%), slowest {est['slowest_step_seconds'] * 1e3:.1f} ms "
            f"({low:.0f} img/s, MFU {100 * est['mfu'][0]:.0f}%)"
        )
    return "\n".join(lines)


def request_from_config(path: str, topology: str, overrides: list[str]) -> PlanRequest:
    """The step a shipped config runs: its student, per-device batch, layout, precisions, teacher, attention, scanned
    blocks and remat (each shapes the compiled program: a plan that dropped the config's remat reported ViT-H/14 at
    64 per chip as needing 38.9 GiB, the attention probabilities of every block kept). A PJRT
    config (``backend.name: xla``: one process per chip, gradients all-reduced) is planned as the SPMD program of
    the same data-parallel layout (fsdp=1 over the topology's chips), the program each chip runs."""
    from digpt_xla.config import load_config

    placeholders = ["teacher.checkpoint=", "data.source=synthetic", "data.urls=", "run.out_dir=memory://plan"]
    cfg = load_config(path, [*placeholders, *overrides])
    keep = [f"teacher.precision={cfg.teacher.precision}", f"teacher.placement={cfg.teacher.placement}"]
    keep.append(f"teacher.clip_model={cfg.teacher.clip_model}")
    keep += [f"model.attention={cfg.model.attention}", f"backend.scan={cfg.backend.scan}"]
    keep.append(f"backend.remat={cfg.backend.remat}")
    return PlanRequest(
        cfg.model.name,
        topology,
        cfg.backend.fsdp,
        cfg.data.batch_size,
        cfg.backend.precision,
        cfg.teacher.kind,
        "pretrain",
        [*keep, *overrides],
        config=str(Path(path)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model name (digpt_xla.models.MODEL_SIZES)")
    parser.add_argument(
        "--config", help="plan the step a pretraining config runs (its student, batch, fsdp, precisions, teacher)"
    )
    parser.add_argument("--topology", "--tpu", help="a libtpu topology: v4:2x2x1, v5e:4x4, v6e:8x8")
    parser.add_argument("--fsdp", type=int, default=1, help="devices that parameters and AdamW state are split over")
    parser.add_argument("--batch", type=int, default=8, help="per-device batch")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--teacher", default="auto", help="auto | clip | pixel")
    parser.add_argument("--step", default="pretrain", help="pretrain | finetune (timm ViT, 1000 classes, digits)")
    parser.add_argument("--max-batch", action="store_true", help="find the largest per-device batch that fits")
    parser.add_argument("--jax-python", default="", help="interpreter with jax[tpu] (default: .venv-tpu)")
    parser.add_argument("--out", default=str(REPO / "runs/bench"), help="OUT/<topology>/<name>.json (--out bench)")
    parser.add_argument("--name", default="")
    parser.add_argument("--workdir", type=Path, help="keep the traced and compiled programs here")
    parser.add_argument(
        "--assemble", type=Path, metavar="WORKDIR", help="the plan of a kept --workdir again, without compiling"
    )
    parser.add_argument("--markdown", nargs="+", type=Path, help="print these committed plans as a markdown table")
    parser.add_argument(
        "--table",
        choices=TABLES,
        default="plans",
        help="with --markdown: every plan, memory per chip beside XLA:CPU (bench/cpu-*), or the largest batches",
    )
    parser.add_argument("--update-docs", action="store_true", help="rewrite the docs' tables from bench/*.json")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value config overrides")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    # A mistake or an impossible plan (a ValueError from the plan's own checks): one line, exit status 2.
    return run_entry("tpu_plan.py", lambda: _run(args, parser), (ValueError,), log_level=logging.WARNING)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.update_docs:
        docs = updated_docs(REPO)
        for path, text in docs.items():
            changed = path.read_text() != text
            path.write_text(text)
            print(f"{path.relative_to(REPO)}: {'updated' if changed else 'unchanged'}")
        return 0
    if args.markdown:
        print(markdown(args.markdown, args.table))
        return 0
    if args.assemble:
        try:
            request = PlanRequest(**json.loads((args.assemble / "request.json").read_text()))
            plan = assemble(args.assemble, describe(request.topology, jax_python(args.jax_python)))
        except (OSError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"--assemble {args.assemble}: not a kept plan workdir ({e})") from None
        stem = Path(request.config).stem if request.config else plan["name"]
        return _write(plan, Path(args.out), args.name or f"plan_{stem}")
    if not ((args.model or args.config) and args.topology):
        parser.error("--model (or --config) and --topology are required (or --markdown FILES)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # found now, not after minutes of compiling
        raise ValueError(f"--out {out}: not a directory")
    if args.config:
        request = request_from_config(args.config, args.topology, list(args.overrides))
    else:
        request = PlanRequest(
            args.model,
            args.topology,
            args.fsdp,
            args.batch,
            args.precision,
            args.teacher,
            args.step,
            list(args.overrides),
        )
    python = jax_python(args.jax_python)
    if args.max_batch:
        print(f"largest batch of {request.model} on {args.topology} at fsdp={request.fsdp}:", flush=True)
        result = max_batch(request, python, start=request.batch)
        plan = result["plan"] | {"max_batch": {k: v for k, v in result.items() if k != "plan"}}
        name = args.name or f"max_batch_{request.model}_fsdp{request.fsdp}"
    else:
        plan = plan_step(request, python, workdir=args.workdir, progress=_progress)
        name = args.name or (f"plan_{Path(args.config).stem}" if args.config else f"plan_{plan['name']}")
    _write(plan, out, name)
    if args.max_batch:
        mb = plan["max_batch"]
        print(
            f"  max per-device batch {mb['max_per_device_batch']} ({mb['settled_by']}: "
            f"{mb['headroom_bytes'] / GIB:.2f} GiB left, {mb['bytes_per_sample'] / 2**20:.1f} MiB per image); the "
            f"release's global batch 4096 needs {mb['chips_for_global_batch_4096']} chips"
        )
    return 0


def _write(plan: dict, out: Path, name: str) -> int:
    path = out / plan["topology"].replace(":", "_") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1) + "\n")
    print(table(plan))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
