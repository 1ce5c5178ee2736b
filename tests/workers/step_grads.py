"""One forward/backward of digpt_tiny from the Pretrainer; saves loss and gradients (rank 0) to argv[1].

Run under torchrun (DDP, gloo) or with backend.name=xla-spmd; extra argv are config overrides."""

import logging
import sys

import torch
from _leave import leave  # this folder is the script's sys.path[0]

from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer

logging.basicConfig(level=logging.INFO, force=True)
out_path, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config(None, ["run.progress=false", "run.resume=never", *overrides])
trainer = Pretrainer(cfg)
batches, orders = trainer.step_inputs()
loss, _, _ = trainer.forward_backward(batches, orders)
trainer.backend.reduce_gradients(trainer.optimizer)
loss = trainer.backend.all_reduce_mean(loss.detach())
trainer.backend.mark_step()  # one graph for the whole step; reading grads one by one would trace one each
model = trainer.backend.unwrap(trainer.model)
grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
if trainer.backend.is_main:
    torch.save({"loss": loss.cpu(), "grads": grads}, out_path)
backend = trainer.backend
del trainer  # the DDP model and its reducer go before their process group
leave(backend)
