"""Evaluate a seeded, freshly built digpt_tiny classifier on the digits held-out set; rank 0 writes
{top1, top5, samples} as JSON to argv[1]. Run plain or under torchrun (gloo); extra argv are config overrides."""

import json
import sys

from _leave import leave  # this folder is the script's sys.path[0]

from digpt_xla.config import load_config
from digpt_xla.engine.finetune import Finetuner, evaluate

out_path, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config("yaml/finetune/tiny_digits.yaml", ["run.resume=never", *overrides])
tuner = Finetuner(cfg)
result = evaluate(tuner.model, tuner.eval_set, tuner.backend, cfg.finetune.eval_batch_size)
if tuner.backend.is_main:
    with open(out_path, "w") as f:
        json.dump(result.__dict__ | {"world": tuner.backend.data_world_size}, f)
backend = tuner.backend
del tuner  # the DDP model and its reducer go before their process group
leave(backend)
