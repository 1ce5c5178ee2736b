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
import sys
from pathlib import Path

from digpt_xla.cli import one_line
from digpt_xla.errors import UserError
from digpt_xla.tpu_plan.plan import PlanRequest, jax_python, max_batch, plan_step
from digpt_xla.tpu_plan.tables import GIB, TABLES, markdown, updated_docs

REPO = Path(__file__).resolve().parent.parent


def _error(e: Exception) -> int:
    """A mistake or an impossible plan: one line on stderr, exit status 2."""
    print(f"tpu_plan.py: error: {one_line(e)}", file=sys.stderr)
    return 2


def table(plan: dict) -> str:
    """The plan as a few aligned lines."""
    head = f"{plan['step']} step of {plan['model']} on {plan['topology']} ({plan['devices']} x {plan['device_kind']})"
    head += f", fsdp={plan['fsdp']}"
    head += f", {plan['per_device_batch']} per device (global {plan['global_batch']}), compiled in "
    head += f"{plan['compile_seconds']:.0f}s by libtpu {plan['libtpu']}"
    hbm = plan["hbm_bytes"] / GIB
    if not plan["fits"]:
        return f"{head}\n  does not fit: needs {plan['needed_bytes'] / GIB:.2f} GiB of {hbm:.2f} GiB per device"
    lines = [
        head,
        f"  arguments {plan['argument_bytes'] / GIB:8.3f} GiB  (sharded state {plan['state_bytes'] / GIB:.3f}, "
        f"teacher {plan['teacher_bytes'] / GIB:.3f}, batch {plan['batch_bytes'] / GIB:.3f})",
        f"  temporaries {plan['temp_bytes'] / GIB:6.3f} GiB",
        f"  outputs not aliased {plan['unaliased_output_bytes'] / GIB:.3f} GiB",
        f"  total {plan['total_bytes'] / GIB:12.3f} GiB of {hbm:.2f} GiB HBM: fits",
        f"  {plan['flops'] / 1e12:.2f} TFLOP and {plan['bytes_accessed'] / 1e9:.1f} GB accessed per device-step",
        "  collectives: "
        + ", ".join(
            f"{k} {v['count']} ({v['bytes'] / 2**20:.0f} MiB)" for k, v in plan["collectives"].items() if v["count"]
        ),
    ]
    est = plan.get("estimate")
    if est:
        images = plan["global_batch"] / est["step_seconds"]
        lines.append(
            f"  estimate (roofline, not measured): step {est['step_seconds'] * 1e3:.0f} ms = {images:.0f} img/s, "
            f"MFU {100 * est['mfu']:.0f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model name (digpt_xla.models.MODEL_SIZES)")
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
    if args.update_docs:
        try:
            docs = updated_docs(REPO)
        except ValueError as e:
            return _error(e)
        for path, text in docs.items():
            changed = path.read_text() != text
            path.write_text(text)
            print(f"{path.relative_to(REPO)}: {'updated' if changed else 'unchanged'}")
        return 0
    if args.markdown:
        try:
            print(markdown(args.markdown, args.table))
        except ValueError as e:
            return _error(e)
        return 0
    if not (args.model and args.topology):
        parser.error("--model and --topology are required (or --markdown FILES)")
    request = PlanRequest(
        args.model, args.topology, args.fsdp, args.batch, args.precision, args.teacher, args.step, list(args.overrides)
    )
    try:
        python = jax_python(args.jax_python)
        if args.max_batch:
            print(f"largest batch of {args.model} on {args.topology} at fsdp={args.fsdp}:", flush=True)
            result = max_batch(request, python, start=args.batch)
            plan = result["plan"] | {"max_batch": {k: v for k, v in result.items() if k != "plan"}}
            name = args.name or f"max_batch_{args.model}_fsdp{args.fsdp}"
        else:
            plan = plan_step(request, python)
            name = args.name or f"plan_{plan['name']}"
    except (UserError, ValueError) as e:
        return _error(e)
    path = Path(args.out) / args.topology.replace(":", "_") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1) + "\n")
    print(table(plan))
    if args.max_batch:
        mb = plan["max_batch"]
        print(
            f"  max per-device batch {mb['max_per_device_batch']} ({mb['settled_by']}: "
            f"{mb['headroom_bytes'] / GIB:.2f} GiB left, {mb['bytes_per_sample'] / 2**20:.1f} MiB per image); the "
            f"release's global batch 4096 needs {mb['chips_for_global_batch_4096']} chips"
        )
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
