#!/usr/bin/env python
"""Benchmarks, written as JSON under bench/<device>/<name>.json with a one-line summary.

    python tools/bench.py train --model digpt_vit_base_patch16_224 --backend cpu --batch 8 --steps 5
    python tools/bench.py train --model digpt_tiny --backend xla --batch 32 --steps 20

``train`` times warm training steps (forward, backward, AdamW; teacher optional) of the real Pretrainer step,
counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode``, measures the machine's matmul peak in the same
run, and reports MFU; on XLA also compilations, ``aten::`` CPU fallbacks and device-to-host transfers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from digpt_xla.config import load_config  # noqa: E402
from digpt_xla.engine import Pretrainer  # noqa: E402


def device_name(backend) -> str:
    if backend.device.type == "cuda":
        return torch.cuda.get_device_name(backend.device).replace(" ", "_")
    if backend.name.startswith("xla") and os.environ.get("PJRT_DEVICE", "CPU").upper() != "CPU":
        return os.environ["PJRT_DEVICE"].lower()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu-{cpu.split()[0].lower()}-{os.cpu_count()}c"


def matmul_peak(device: torch.device, dtype: torch.dtype, sync, n: int = 2048, reps: int = 5) -> float:
    """Measured GFLOP/s of an n x n matmul on ``device`` (the best of ``reps``)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync(a @ b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        sync(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def count_flops(trainer: Pretrainer, batches, orders) -> int:
    """FLOPs of one training step's forward and backward (optimizer excluded).

    Counted on the CPU for one sample and scaled by the step's samples: every op of the step is linear in the
    batch, and the count is then cheap even for a ViT-H/14 teacher at a GPU-sized batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from digpt_xla.models import DiGPT

    model = DiGPT(trainer.model_cfg)
    teacher = copy.deepcopy(trainer.backend.unwrap(trainer.teacher)).to("cpu").float()
    images = batches[0]["images"][:1].cpu()
    with FlopCounterMode(display=False) as counter:
        targets = teacher(images).float()
        out = model(images, targets, orders[0][:1].cpu())
        (out.ar_loss + out.kd_loss).backward()
    return counter.get_total_flops() * batches[0]["images"].shape[0] * trainer.accum


def default_name(args: argparse.Namespace, cfg) -> str:
    teacher = cfg.teacher.clip_model if cfg.teacher.kind == "clip" else cfg.teacher.kind
    compiled = "_compile" if cfg.backend.compile else ""
    return f"train_{args.model}_{args.backend}_{args.precision}_{teacher}_b{args.batch}{compiled}"


def bench_train(args: argparse.Namespace) -> dict:
    overrides = [
        f"model.name={args.model}", f"backend.name={args.backend}", f"backend.precision={args.precision}",
        f"data.source={args.source}", f"data.batch_size={args.batch}", f"teacher.kind={args.teacher}",
        "run.progress=false", "run.resume=never", f"run.out_dir={args.out_dir}", "run.knn_eval=false",
        "schedule.epochs=1000", "data.synthetic_size=100000", *args.overrides,
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    trainer = Pretrainer(cfg)
    b = trainer.backend
    is_xla = b.name.startswith("xla")

    def sync(t=None):
        b.synchronize()

    stream = trainer.device_batches()
    times, after_warmup = [], {}
    for i in range(args.warmup + args.steps):
        inputs = trainer.next_step_inputs(stream)
        sync()
        t = time.perf_counter()
        trainer.train_step(*inputs)
        trainer.step += 1
        b.mark_step()
        sync()
        times.append(time.perf_counter() - t)
        if i == args.warmup - 1:
            after_warmup = b.debug_counters()
    end = b.debug_counters()  # before the FLOP count and the matmul peak, which run graphs of their own
    warm = times[args.warmup :]
    flops = count_flops(trainer, *trainer.next_step_inputs(stream))
    peak32 = matmul_peak(b.device, torch.float32, sync)
    result = {
        "name": args.name or default_name(args, cfg),
        "model": args.model, "backend": b.name, "precision": args.precision, "teacher": args.teacher,
        "torch_compile": cfg.backend.compile,
        "per_device_batch": args.batch, "effective_batch": trainer.effective_batch, "device": device_name(b),
        "torch": torch.__version__, "warm_steps": args.steps, "warmup_steps": args.warmup,
        "step_time_s": {"median": statistics.median(warm), "min": min(warm), "max": max(warm)},
        "first_steps_s": times[: args.warmup],
        "images_per_s": trainer.effective_batch / statistics.median(warm),
        "flops_per_step": flops,
        "achieved_gflops": flops / statistics.median(warm) / 1e9,
        "matmul_peak_gflops": {"fp32": peak32},
    }  # fmt: skip
    peak = peak32
    if args.precision == "bf16" and b.device.type == "cuda":
        result["matmul_peak_gflops"]["bf16"] = peak = matmul_peak(b.device, torch.bfloat16, sync, n=8192)
    result["mfu"] = result["achieved_gflops"] / peak
    if b.device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(b.device) / 2**30
    else:
        import resource

        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if is_xla:
        result["xla"] = {
            "compilations_total": end["compilations"],
            "compile_time_s_total": end["compile_time_s"],
            "compilations_after_warmup": end["compilations"] - after_warmup.get("compilations", 0),
            "aten_fallbacks": end["aten_fallbacks"],
            "device_to_host_transfers_after_warmup": end["device_to_host_transfers"]
            - after_warmup.get("device_to_host_transfers", 0),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="time warm training steps")
    t.add_argument("--model", default="digpt_tiny")
    t.add_argument("--backend", default="cpu")
    t.add_argument("--precision", default="fp32")
    t.add_argument(
        "--teacher",
        default="pixel",
        help="pixel | clip (random weights unless teacher.checkpoint=...; the speed is the same)",
    )
    t.add_argument("--source", default="synthetic")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--name", default="")
    t.add_argument("--out", default=str(REPO / "bench"))
    t.add_argument("--out-dir", default="/tmp/digpt_bench_run", help="run directory of the benchmarked trainer")
    t.add_argument("overrides", nargs="*", help="extra section.key=value config overrides")
    args = parser.parse_args(argv)
    result = bench_train(args)
    path = Path(args.out) / result["device"] / f"{result['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    xla = result.get("xla", {})
    print(
        f"{result['name']} on {result['device']}: {result['images_per_s']:.1f} img/s, step "
        f"{result['step_time_s']['median']:.3f}s, {result['achieved_gflops']:.1f} GFLOP/s = "
        f"{100 * result['mfu']:.0f}% of the measured matmul peak"
        + (f", {xla['compilations_after_warmup']} compilations after warm-up" if xla else "")
        + f" -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
