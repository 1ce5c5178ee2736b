"""Trace one training step on XLA:CPU devices and write it as an HloModuleProto, without compiling it.

    python -m digpt_xla.tpu_plan.trace OUT_DIR pretrain|finetune HBM_BYTES model.name=... backend.fsdp=... ...

Run with ``PJRT_DEVICE=CPU CPU_NUM_DEVICES=<the topology's devices>`` (``tools/tpu_plan.py`` does): the step is
the real one (student, teacher, AdamW, the shipped FSDPv2 sharding) on a mesh of that many virtual devices. Writes
``step.hlo.pb``, ``donors.json`` (which parameters torch_xla would donate to which results: the state the step
writes back, by tensor identity) and ``trace.json`` (what one device holds: the sharded training state, the
teacher, the batch; the parameter counts behind the FSDP minimum; FLOPs per image counted by ``digpt_xla.flops``).
``teacher.placement=auto`` is decided for a chip of HBM_BYTES (XLA:CPU devices have no memory of their own).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from ..backend.mesh import ParallelDims
from ..config import load_config
from ..engine import Pretrainer
from ..engine.build import build_model_and_teacher, segment_orders
from ..engine.finetune import Finetuner
from ..flops import sample_flops
from ..precision import stored_bytes, teacher_precision

SOURCES = {"pretrain": "synthetic", "finetune": "digits"}  # made by the code: nothing to download


def _shard_bytes(backend, tensors) -> int:
    return sum(math.prod(backend.shard_shapes(t)[0]) * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _flops_per_image(model_cfg, teacher) -> int:
    """Teacher forward + student forward and backward for one image, counted on the CPU (``digpt_xla.flops``)."""
    size = model_cfg.img_size
    order = segment_orders(0, 0, 0, 1, model_cfg.num_segments)
    return sample_flops(model_cfg, teacher, torch.randn(1, 3, size, size), order)


def trace_step(out_dir: Path, kind: str, hbm_bytes: int, overrides: list[str]) -> dict:
    start = time.perf_counter()
    common = ["backend.name=xla-spmd", f"data.source={SOURCES[kind]}", "run.resume=never", "run.progress=false"]
    cfg = load_config(None, [*common, "run.knn_eval=false", f"run.out_dir={out_dir / 'run'}", *overrides])
    analytic_flops = None
    if kind == "pretrain":
        student, cpu_teacher = build_model_and_teacher(cfg.model, cfg.teacher)  # on the CPU: FLOPs, stored bytes
        precision = teacher_precision(cfg.teacher.precision, cfg.backend.precision)
        stored = stored_bytes(cpu_teacher, precision)
        dims = ParallelDims(cfg.backend.name, cfg.backend.fsdp)
        cfg.teacher.placement = dims.teacher_placement(cfg.teacher.placement, stored, hbm_bytes)
        model_cfg = student.cfg
        del student  # ViT-H/14's fp32 copy: 2.9 GB of host memory the trace below needs
    trainer = Pretrainer(cfg) if kind == "pretrain" else Finetuner(cfg)
    if kind == "pretrain":  # counted once the runtime is up (autograd's device threads start with it), then freed
        analytic_flops = _flops_per_image(model_cfg, cpu_teacher)
        del cpu_teacher
    b = trainer.backend
    b.mark_step()  # setup's own small programs run now; what follows is the step alone
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    params = list(trainer.model.parameters())
    # Read before the step is traced: a shard's shape of a tensor with pending work would run that work.
    state_bytes = _shard_bytes(b, [*params, *state])
    teacher = getattr(trainer, "teacher", None)  # finetuning has none
    # What the teacher holds on the device: its parameters there, and the stacks of its scanned blocks' weights
    # (their own parameters are then left on the meta device).
    on_device = [t for t in (*teacher.parameters(), *teacher.buffers()) if t.device.type == "xla"] if teacher else []
    teacher_bytes = _shard_bytes(b, on_device)
    outputs = [t for t in (*params, *state) if t.device.type == "xla"]  # what the step replaces (AdamW's step count
    identities = b.data_identities(outputs)  # may live on the host): torch_xla donates their buffers to their updates
    inputs = trainer.step_inputs()
    trainer.run_step(inputs, cut=False)  # traced, not run: its program is exported below
    proto, donors = b.export_program(outputs, identities)
    (out_dir / "step.hlo.pb").write_bytes(proto)
    (out_dir / "donors.json").write_text(json.dumps(donors) + "\n")
    plan = trainer.plan  # what the step was set up as: layout, precisions, placement, batch
    devices = plan.devices
    per_device_batch = plan.batch_per_device
    tensors = [v for batch in inputs[0] for v in batch.values()] + [t for extra in inputs[1:] for t in extra]
    batch_bytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    teacher_name = cfg.teacher.kind if cfg.teacher.kind == "pixel" else f"clip {cfg.teacher.clip_model}"
    teacher_params = list(teacher.parameters()) if teacher is not None else []
    info = {
        "step": kind,
        "model": cfg.model.name,
        "teacher": teacher_name if kind == "pretrain" else None,
        "precision": plan.precision,
        "devices": devices,
        "fsdp": plan.fsdp,
        "per_device_batch": per_device_batch,
        "global_batch": per_device_batch * devices,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "state_bytes": state_bytes,
        "teacher_bytes": teacher_bytes,
        "batch_bytes": batch_bytes // devices,
        "donated_buffers": len(donors),
        # The FSDP minimum's inputs: what the layout must move, whatever the compiler makes of it.
        "teacher_params": sum(p.numel() for p in teacher_params),
        "teacher_sharded": teacher_bytes < sum(p.numel() * p.element_size() for p in teacher_params),
        "teacher_precision": plan.teacher_precision,
        "teacher_placement": plan.teacher_placement,
        "analytic_flops_per_image": analytic_flops,
        "trace_seconds": round(time.perf_counter() - start, 1),
        "run_plan": plan.to_dict(),
    }
    (out_dir / "trace.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    print(json.dumps(trace_step(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:])))
