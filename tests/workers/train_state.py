"""Train digpt_tiny with the given config overrides; rank 0 saves to argv[1]: the logged losses, the final
parameters (whole, on the CPU), how each parameter and AdamW moment is split across this process's devices, and
the compiler counters. Runs alone, under torchrun, or with backend.name=xla-spmd and CPU_NUM_DEVICES."""

import logging
import sys

import torch

from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer
from digpt_xla.engine.metrics import read_metrics

logging.basicConfig(level=logging.INFO, force=True)
out_path, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config(None, ["run.progress=false", "run.log_every=1", *overrides])
trainer = Pretrainer(cfg)
b = trainer.backend
initial = {k: v.clone() for k, v in b.model_state_cpu(trainer.model).items()}  # live tensors on the CPU
compilations = []  # after each step (its metrics flushed): the step must not compile again after the first
after_step = trainer.after_step
trainer.after_step = lambda: (compilations.append(b.debug_counters().get("compilations", 0)), after_step())
result = trainer.train()
model = b.unwrap(trainer.model)
shards = {}
for name, p in model.named_parameters():
    if not p.requires_grad:
        continue
    moments = trainer.optimizer.state[p]
    shards[name] = {
        "numel": p.numel(),
        "param": b.shard_shapes(p),
        "exp_avg": b.shard_shapes(moments["exp_avg"]),
        "exp_avg_sq": b.shard_shapes(moments["exp_avg_sq"]),
    }
params = b.model_state_cpu(trainer.model)
counters = b.debug_counters()
if b.is_main:
    losses = {r["step"]: r["loss"] for r in read_metrics(cfg.run.out_dir) if "loss" in r}
    torch.save(
        {
            "losses": losses,
            "initial": initial,
            "params": params,
            "shards": shards,
            "counters": counters,
            "compilations": compilations,
            "checkpoint": result.checkpoint,
            "devices": b.global_devices,
        },
        out_path,
    )
b.shutdown()
