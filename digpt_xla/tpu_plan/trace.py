"""Trace one training step on XLA:CPU devices and write it as an HloModuleProto, without compiling it.

    python -m digpt_xla.tpu_plan.trace OUT_DIR pretrain|finetune model.name=... backend.fsdp=... data.batch_size=...

Run with ``PJRT_DEVICE=CPU CPU_NUM_DEVICES=<the topology's devices>`` (``tools/tpu_plan.py`` does): the step is
the real one (student, teacher, AdamW, the shipped FSDPv2 sharding) on a mesh of that many virtual devices. Writes
``step.hlo.pb`` and ``trace.json`` (what one device holds: the sharded training state, the teacher, the batch).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from ..config import load_config
from ..engine import Pretrainer
from ..engine.finetune import Finetuner

SOURCES = {"pretrain": "synthetic", "finetune": "digits"}  # made by the code: nothing to download


def _shard_bytes(backend, tensors) -> int:
    return sum(math.prod(backend.shard_shapes(t)[0]) * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def trace_step(out_dir: Path, kind: str, overrides: list[str]) -> dict:
    start = time.perf_counter()
    common = ["backend.name=xla-spmd", f"data.source={SOURCES[kind]}", "run.resume=never", "run.progress=false"]
    cfg = load_config(None, [*common, "run.knn_eval=false", f"run.out_dir={out_dir / 'run'}", *overrides])
    trainer = Pretrainer(cfg) if kind == "pretrain" else Finetuner(cfg)
    b = trainer.backend
    b.mark_step()  # setup's own small programs run now; what follows is the step alone
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    params = list(trainer.model.parameters())
    # Read before the step is traced: a shard's shape of a tensor with pending work would run that work.
    state_bytes = _shard_bytes(b, [*params, *state])
    teacher = getattr(trainer, "teacher", None)  # finetuning has none
    teacher_bytes = _shard_bytes(b, list(teacher.parameters())) if teacher is not None else 0
    inputs = trainer.next_step_inputs(trainer.data_stream())
    trainer.train_step(*inputs)
    outputs = [*params, *state]  # what the step replaces: torch_xla donates these buffers when it runs
    (out_dir / "step.hlo.pb").write_bytes(b.export_program(outputs))
    devices = b.global_devices
    per_device_batch = cfg.data.batch_size
    tensors = [v for batch in inputs[0] for v in batch.values()] + [t for extra in inputs[1:] for t in extra]
    batch_bytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    teacher_name = cfg.teacher.kind if cfg.teacher.kind == "pixel" else f"clip {cfg.teacher.clip_model}"
    info = {
        "step": kind,
        "model": cfg.model.name,
        "teacher": teacher_name if kind == "pretrain" else None,
        "precision": cfg.backend.precision,
        "devices": devices,
        "fsdp": cfg.backend.fsdp,
        "per_device_batch": per_device_batch,
        "global_batch": per_device_batch * devices,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "state_bytes": state_bytes,
        "teacher_bytes": teacher_bytes,
        "batch_bytes": batch_bytes // devices,
        "trace_seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / "trace.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    print(json.dumps(trace_step(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])))
