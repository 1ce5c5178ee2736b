#!/usr/bin/env python
"""Benchmarks, written as JSON under bench/<device>/<name>.json with a one-line summary.

    python tools/bench.py train --model digpt_vit_base_patch16_224 --backend cpu --batch 8 --steps 5
    python tools/bench.py train --model digpt_tiny --backend xla --batch 32 --steps 20
    python tools/bench.py data --source webdataset --img-size 224 --workers 0
    python tools/bench.py baseline --timm-model vit_base_patch16_224 --batch 8
    python tools/bench.py recount bench/*/*.json
    python tools/bench.py memory --model digpt_vit_large_patch16_224 --backend xla-spmd --fsdp 8 --batch 32

``train`` times warm training steps (forward, backward, AdamW; teacher optional) of the real Pretrainer step,
counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode``, measures the machine's matmul peak in the same
run, and reports MFU; on XLA also compilations, ``aten::`` CPU fallbacks and device-to-host transfers.
``memory`` gives the per-device memory of one training step with parameters and AdamW state split over ``--fsdp``
devices: on XLA (XLA:CPU with that many virtual devices, or a TPU slice) from the compiled program's buffer
assignment, without running the step; on CUDA (under torchrun for fsdp > 1) from ``max_memory_allocated``.
``data`` times decode + augmentation of a data source on generated ImageNet-sized JPEGs (images/s per core).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer
from digpt_xla.entry import run_entry
from digpt_xla.flops import FLOP_COUNTER, matmul_peak, sample_flops, timm_flops
from digpt_xla.models import digpt_config

REPO = Path(__file__).resolve().parent.parent


def device_name(backend) -> str:
    """The GPU's or TPU's name, else the CPU model and core count (``backend=None``: the host CPU)."""
    if backend is not None and backend.device.type == "cuda":
        return torch.cuda.get_device_name(backend.device).replace(" ", "_")
    if backend is not None and backend.name.startswith("xla") and os.environ.get("PJRT_DEVICE", "CPU").upper() != "CPU":
        return os.environ["PJRT_DEVICE"].lower()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    vendor = cpu.split()[0].lower().replace("(r)", "").replace("(tm)", "")  # "Intel(R) Xeon(R) ..." -> intel
    return f"cpu-{vendor}-{os.cpu_count()}c"


def count_flops(trainer: Pretrainer, batches, orders) -> int:
    """FLOPs of one training step's forward and backward (optimizer excluded).

    Counted on the CPU for one sample and scaled by the step's samples: every op of the step is linear in the
    batch, and the count is then cheap even for a ViT-H/14 teacher at a GPU-sized batch."""
    teacher = copy.deepcopy(trainer.backend.unwrap(trainer.teacher))
    per_sample = sample_flops(trainer.model_cfg, teacher, batches[0]["images"][:1].cpu(), orders[0][:1].cpu())
    return per_sample * batches[0]["images"].shape[0] * trainer.plan.accumulation


def recount(path: Path) -> dict:
    """Recount ``flops_per_step`` of a committed train/baseline result with the current counter; step times and
    the matmul peak stay as measured. The previous count and MFU are kept under ``recounted``."""
    result = json.loads(path.read_text())
    if "per_device_batch" in result:
        from digpt_xla.engine.build import build_model_and_teacher, segment_orders

        cfg = load_config(None, [f"model.name={result['model']}", f"teacher.kind={result['teacher']}"])
        model, teacher = build_model_and_teacher(cfg.model, cfg.teacher)
        image = torch.randn(1, 3, model.cfg.img_size, model.cfg.img_size)
        per_sample = sample_flops(model.cfg, teacher, image, segment_orders(0, 0, 0, 1, model.cfg.num_segments))
        flops = per_sample * result["effective_batch"]
    elif "batch" in result:
        import timm

        flops = timm_flops(timm.create_model(result["model"], num_classes=0, global_pool=""), result["batch"])
    else:
        raise SystemExit(f"{path}: not a train or baseline result (no per_device_batch or batch)")
    if flops != result["flops_per_step"]:
        result.setdefault(
            "recounted", {"previous_flops_per_step": result["flops_per_step"], "previous_mfu": result["mfu"]}
        )
    peak = result["matmul_peak_gflops"].get("bf16" if result.get("precision") == "bf16" else "fp32")
    peak = peak or result["matmul_peak_gflops"]["fp32"]
    result["flops_per_step"] = flops
    result["achieved_gflops"] = flops / result["step_time_s"]["median"] / 1e9
    result["mfu"] = result["achieved_gflops"] / peak
    result["flop_counter"] = FLOP_COUNTER
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def default_name(args: argparse.Namespace, cfg) -> str:
    teacher = cfg.teacher.clip_model if cfg.teacher.kind == "clip" else cfg.teacher.kind
    compiled = "_compile" if cfg.backend.compile else ""
    return f"train_{args.model}_{args.backend}_{args.precision}_{teacher}_b{args.batch}{compiled}"


def benchmark_trainer(args: argparse.Namespace, *overrides: str) -> Pretrainer:
    """The real Pretrainer of the benchmarked settings (model, backend, precision, per-device batch, teacher), in a
    scratch run directory, with ``overrides`` and then the command line's own."""
    common = [
        f"model.name={args.model}",
        f"backend.name={args.backend}",
        f"backend.precision={args.precision}",
        f"data.batch_size={args.batch}",
        f"teacher.kind={args.teacher}",
        f"run.out_dir={args.out_dir}",
        "run.resume=never",
        "run.progress=false",
        "run.knn_eval=false",
    ]
    return Pretrainer(load_config(None, [*common, *overrides, *args.overrides]))


def bench_train(args: argparse.Namespace) -> dict:
    trainer = benchmark_trainer(
        args, f"data.source={args.source}", "schedule.epochs=1000", "data.synthetic_size=100000"
    )
    cfg, b = trainer.cfg, trainer.backend
    is_xla = b.name.startswith("xla")

    def sync(t=None):
        b.synchronize()

    times, after_warmup = [], {}
    for i in range(args.warmup + args.steps):
        inputs = trainer.step_inputs()  # read and moved before the clock starts
        sync()
        t = time.perf_counter()
        trainer.run_step(inputs)
        sync()
        times.append(time.perf_counter() - t)
        if i == args.warmup - 1:
            after_warmup = b.debug_counters()
    end = b.debug_counters()  # before the FLOP count and the matmul peak, which run graphs of their own
    warm = times[args.warmup :]
    flops = count_flops(trainer, *trainer.step_inputs())
    peak32 = matmul_peak(b.device, torch.float32, sync)
    result = {
        "name": args.name or default_name(args, cfg),
        "model": args.model,
        "backend": b.name,
        "precision": args.precision,
        "teacher": args.teacher,
        "torch_compile": cfg.backend.compile,
        "per_device_batch": args.batch,
        "effective_batch": trainer.plan.effective_batch,
        "device": device_name(b),
        "torch": torch.__version__,
        "warm_steps": args.steps,
        "warmup_steps": args.warmup,
        "step_time_s": {"median": statistics.median(warm), "min": min(warm), "max": max(warm)},
        "first_steps_s": times[: args.warmup],
        "images_per_s": trainer.plan.effective_batch / statistics.median(warm),
        "flops_per_step": flops,
        "flop_counter": FLOP_COUNTER,
        "achieved_gflops": flops / statistics.median(warm) / 1e9,
        "matmul_peak_gflops": {"fp32": peak32},
    }
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


def sample_images(out: Path, count: int, seed: int = 0) -> Path:
    """An ImageNet-like folder: ``count`` JPEGs of 500x375 (ImageNet's typical size) with smooth random content
    at quality 90, about 30-60 KB each, in 10 classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        noise = rng.normal(0, 12, size=(375, 500, 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        folder = out / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return out


def bench_data(args: argparse.Namespace) -> dict:
    import tempfile

    from digpt_xla.config import DataConfig
    from digpt_xla.data import build_train_dataset, build_train_loader
    from digpt_xla.data.shard_io import image_folder_samples, shard_spec, write_shards

    torch.set_num_threads(1)  # the per-core figure: decode and augmentation of one process on one core
    tmp = Path(tempfile.mkdtemp(prefix="digpt_bench_data_"))
    cfg = DataConfig(source=args.source, batch_size=args.batch, num_workers=args.workers)
    if args.source in ("imagefolder", "webdataset"):
        folder = sample_images(tmp / "folder", args.images)
        cfg.root = str(folder)
        if args.source == "webdataset":
            samples, total, classes = image_folder_samples(str(folder))
            manifest = write_shards(samples, total, str(tmp / "shards"), 64, classes, "bench", progress=False)
            cfg.urls = shard_spec(str(tmp / "shards"), manifest)
    dataset = build_train_dataset(cfg, args.img_size)
    loader = iter(build_train_loader(dataset, args.batch, 0, 1, seed=0, start_batch=0, num_workers=args.workers))
    for _ in range(args.warmup):
        next(loader)
    t = time.perf_counter()
    for _ in range(args.batches):
        batch = next(loader)
    seconds = time.perf_counter() - t
    assert batch["images"].shape == (args.batch, 3, args.img_size, args.img_size)
    images_per_s = args.batches * args.batch / seconds
    processes = max(args.workers, 1)
    return {
        "name": args.name or f"data_{args.source}_{args.img_size}px_w{args.workers}",
        "source": args.source,
        "img_size": args.img_size,
        "batch": args.batch,
        "workers": args.workers,
        "device": device_name(None),
        "torch": torch.__version__,
        "images_per_s": images_per_s,
        "images_per_s_per_core": images_per_s / processes,
        "transform": "RandomResizedCrop(scale=(0.2, 1), bicubic) + flip + normalise"
        if args.source in ("imagefolder", "webdataset")
        else f"{args.source} source's own",
        "input": "500x375 JPEG q90, smooth random content" if args.source in ("imagefolder", "webdataset") else "",
    }


def bench_baseline(args: argparse.Namespace) -> dict:
    """A straightforward reference on the same machine: timm's ViT (fused attention, eager), forward + backward of
    a mean-square loss on its tokens, timed like ``train`` and held to the same matmul peak."""
    import timm

    model = timm.create_model(args.timm_model, num_classes=0, global_pool="")
    x = torch.randn(args.batch, 3, 224, 224)

    def step() -> None:
        model(x).square().mean().backward()

    flops = timm_flops(model, args.batch)
    times = []
    for _ in range(args.warmup + args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    median = statistics.median(times[args.warmup :])
    peak = matmul_peak(torch.device("cpu"), torch.float32, lambda t=None: None)
    return {
        "name": args.name or f"baseline_timm_{args.timm_model}_b{args.batch}",
        "model": args.timm_model,
        "device": device_name(None),
        "torch": torch.__version__,
        "batch": args.batch,
        "step_time_s": {"median": median, "min": min(times[args.warmup :]), "max": max(times[args.warmup :])},
        "flops_per_step": flops,
        "flop_counter": FLOP_COUNTER,
        "achieved_gflops": flops / median / 1e9,
        "matmul_peak_gflops": {"fp32": peak},
        "mfu": flops / median / 1e9 / peak,
    }


HBM_GB = {"tpu_v4": 32, "tpu_v5e": 16, "tpu_v5p": 95, "tpu_v6e": 32, "gpu_80gb": 80}


def bench_memory(args: argparse.Namespace) -> dict:
    if args.backend.startswith("xla"):
        dump = Path(args.out_dir) / "xla_dump"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
        if os.environ.get("PJRT_DEVICE", "CPU").upper() == "CPU":
            os.environ["CPU_NUM_DEVICES"] = str(args.fsdp)  # a slice of fsdp virtual devices, one mesh row
    if args.teacher == "auto":  # the teacher the model's targets come from: CLIP ViT-H/14's 1024 wide tokens, or pixels
        args.teacher = "clip" if digpt_config(args.model).teacher_dim == 1024 else "pixel"
    trainer = benchmark_trainer(args, f"backend.fsdp={args.fsdp}", "data.source=synthetic")
    b = trainer.backend

    def run_step() -> list[torch.Tensor]:
        trainer.run_step(cut=False)  # traced, not run: the compiler's buffer assignment measures it
        state = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [*trainer.model.parameters(), *state]

    measured = b.step_memory(run_step)
    gib = measured["bytes"] / 2**30
    return {
        "name": args.name or f"memory_{args.model}_{args.backend}_fsdp{args.fsdp}_b{args.batch}",
        "kind": "memory",
        "device": device_name(b),
        "model": args.model,
        "teacher": args.teacher,
        "backend": args.backend,
        "precision": args.precision,
        "fsdp": args.fsdp,
        "per_device_batch": args.batch,
        "per_device_bytes": measured["bytes"],
        "per_device_gib": round(gib, 3),
        # On XLA: the step's inputs (this device's weights, AdamW moments and batch) and its temporaries.
        **{k: v for k, v in measured.items() if k.endswith("_bytes")},
        "source": measured["source"],
        "fits": {hbm: gib <= size for hbm, size in HBM_GB.items()},
        "trainable_params_m": round(b.unwrap(trainer.model).num_trainable_params() / 1e6, 1),
        "torch": torch.__version__,
    }


def write_result(result: dict, out: str) -> Path:
    path = Path(out) / result["device"] / f"{result['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


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
    t.add_argument("--out", default=str(REPO / "runs/bench"), help="OUT/<device>/<name>.json (committed: --out bench)")
    t.add_argument("--out-dir", default="/tmp/digpt_bench_run", help="run directory of the benchmarked trainer")
    t.add_argument("overrides", nargs="*", help="extra section.key=value config overrides")
    d = sub.add_parser("data", help="decode + augmentation images/s of a data source")
    d.add_argument("--source", default="webdataset", help="digits | synthetic | imagefolder | webdataset")
    d.add_argument("--img-size", type=int, default=224)
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--batches", type=int, default=10, help="timed batches")
    d.add_argument("--warmup", type=int, default=2)
    d.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: the main process, one core)")
    d.add_argument("--images", type=int, default=512, help="JPEGs generated for imagefolder/webdataset")
    d.add_argument("--name", default="")
    d.add_argument("--out", default=str(REPO / "runs/bench"), help="OUT/<device>/<name>.json (committed: --out bench)")
    r = sub.add_parser("baseline", help="a straightforward reference: timm ViT forward + backward on the CPU")
    r.add_argument("--timm-model", default="vit_base_patch16_224")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--name", default="")
    r.add_argument("--out", default=str(REPO / "runs/bench"), help="OUT/<device>/<name>.json (committed: --out bench)")
    m = sub.add_parser("memory", help="per-device memory of one training step, with --fsdp sharding")
    m.add_argument("--model", default="digpt_tiny", help="a model name (digpt_xla.models.MODEL_SIZES)")
    m.add_argument(
        "--backend",
        default="xla-spmd",
        help="xla-spmd (compiled, not run: XLA's buffer assignment; "
        "on XLA:CPU with --fsdp virtual devices) | cuda (measured peak)",
    )
    m.add_argument("--fsdp", type=int, default=1, help="devices that parameters and AdamW state are split over")
    m.add_argument("--batch", type=int, default=8, help="per-device batch")
    m.add_argument("--precision", default="fp32", help="fp32 | bf16 (| fp16 on cuda)")
    m.add_argument(
        "--teacher",
        default="auto",
        help="auto (the model's own: CLIP ViT-H/14 with random weights for "
        "the ViT sizes, pixels for digpt_tiny) | clip | pixel",
    )
    m.add_argument("--name", default="", help="result name (default: from the settings)")
    m.add_argument(
        "--out",
        default=str(REPO / "runs/bench"),
        help="results go to OUT/<device>/<name>.json (committed figures: --out bench)",
    )
    m.add_argument("--out-dir", default="/tmp/digpt_bench_memory", help="run directory (and the XLA dump)")
    m.add_argument("overrides", nargs="*", help="extra section.key=value config overrides")
    rc = sub.add_parser("recount", help="recount FLOPs and MFU of committed train/baseline JSON files")
    rc.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    return run_entry("bench.py", lambda: _run(args), log_level=logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    if args.command == "recount":
        for path in args.files:
            result = recount(path)
            before = result.get("recounted", {}).get("previous_mfu", result["mfu"])
            print(
                f"{path}: {result['flops_per_step'] / 1e9:.1f} GFLOP per step, MFU {100 * before:.1f}% -> "
                f"{100 * result['mfu']:.1f}%"
            )
        return 0
    if args.command == "baseline":
        result = bench_baseline(args)
        path = write_result(result, args.out)
        speed = f"{result['achieved_gflops']:.1f} GFLOP/s = {100 * result['mfu']:.0f}% of the matmul peak"
        print(f"{result['name']} on {result['device']}: step {result['step_time_s']['median']:.3f}s, {speed} -> {path}")
        return 0
    if args.command == "memory":
        result = bench_memory(args)
        path = write_result(result, args.out)
        fits = ", ".join(k for k, ok in result["fits"].items() if ok) or "none of the listed chips"
        print(
            f"{result['name']} on {result['device']}: {result['per_device_gib']:.2f} GiB per device "
            f"(fits {fits}) -> {path}"
        )
        return 0
    if args.command == "data":
        result = bench_data(args)
        path = write_result(result, args.out)
        print(
            f"{result['name']} on {result['device']}: {result['images_per_s']:.1f} img/s, "
            f"{result['images_per_s_per_core']:.1f} img/s per core -> {path}"
        )
        return 0
    result = bench_train(args)
    path = write_result(result, args.out)
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
