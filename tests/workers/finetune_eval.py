"""Evaluate a seeded, freshly built digpt_tiny classifier on the digits held-out set; rank 0 writes
{top1, top5, samples} as JSON to argv[1]. Run plain or under torchrun (gloo); extra argv are config overrides."""

import json
import os
import sys

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
backend.shutdown()
# This worker skips train(), which ends a run in order; leave without interpreter teardown, where a gloo thread
# still being joined made one rank abort now and then ("terminate called without an active exception").
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
