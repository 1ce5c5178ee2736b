"""The optimizer step: one implementation for pretraining, finetuning and the parity harness.

It owns what happens between the forward pass and the next one: the (scaled) backward of each micro-batch,
the learning-rate write (a device tensor on XLA), the gradient all-reduce where the wrapper does not do it, loss
scaling (fp16 on CUDA), clipping, the update and the zeroing. The non-finite check lives in the metrics
(``DeferredMeter`` counts non-finite losses on the device), so the step itself never reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..backend import Backend
from ..config import OptimConfig


def init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's per-parameter state now, as its first ``step()`` would (zeros, step 0).

    On XLA the first step would otherwise trace a graph of its own (state creation inside it) and compile twice.
    """
    for group in optimizer.param_groups:
        if group["amsgrad"]:
            raise ValueError("init_adamw_state supports AdamW without amsgrad")
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                # torch keeps the step count with the parameter when capturable or fused, on the host otherwise
                on_device = {"device": p.device} if group["capturable"] or group["fused"] else {}
                state["step"] = torch.zeros((), dtype=torch.float32, **on_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def build_adamw(
    param_groups: list[dict[str, Any]], optim: OptimConfig, backend: Backend, lr: float
) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` with the backend's options (fused on CUDA, capturable on XLA) or the kernel
    ``optim.implementation`` names, its state created up front. ``lr`` is a float: torch checks it on the host;
    ``OptimizerStep`` writes the backend's form."""
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=lr,
        betas=(optim.betas[0], optim.betas[1]),
        eps=optim.eps,
        **backend.optimizer_options(optim.implementation),
    )
    init_adamw_state(optimizer)
    backend.place_optimizer_state(optimizer)  # moments split like their parameters (FSDPv2)
    return optimizer


def clip_grad_norm(params: list[nn.Parameter], clip: float | None) -> Tensor:
    """The total gradient norm (a device tensor), after clipping the gradients to ``clip`` when it is set."""
    grads = [p for p in params if p.grad is not None]
    if clip:
        return torch.nn.utils.clip_grad_norm_(grads, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in grads if p.grad is not None])


class OptimizerStep:
    """Backward and update of one optimizer step, in the numeric setting of ``precision``.

    ``param_group["lr_scale"]`` (timm's layer-wise decay) multiplies the scheduled lr of its group.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, backend: Backend, precision: str, clip_grad: float | None = None
    ) -> None:
        self.optimizer, self.backend = optimizer, backend
        self.clip_grad = clip_grad
        self.scaler = backend.grad_scaler(precision)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def backward(self, loss: Tensor, micro_batches: int = 1) -> None:
        """Accumulate the gradient of one micro-batch's loss (averaged over the step's micro-batches)."""
        scaled = loss / micro_batches
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def step(self, lr: float, inspect: Callable[[], None] | None = None) -> Tensor:
        """Reduce, unscale, clip, update and zero; returns the gradient norm before clipping (a device tensor; inf
        or NaN on a step the loss scaler skips). ``inspect`` (parity) is called once the gradients are reduced and
        unscaled, before they are clipped and applied."""
        b, opt = self.backend, self.optimizer
        for group in opt.param_groups:
            group["lr"] = b.learning_rate(lr * group.get("lr_scale", 1.0))
        b.reduce_gradients(opt)
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if inspect is not None:
            inspect()
        grad_norm = b.full_value(clip_grad_norm(self.params, self.clip_grad))
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return grad_norm

    def settings(self) -> dict[str, Any]:
        """What this step runs, for reports: the optimizer's options and the loss scaling and clipping."""
        group = self.optimizer.param_groups[0]
        return {
            "optimizer": type(self.optimizer).__name__,
            **{k: group.get(k) for k in ("betas", "eps", "fused", "capturable", "foreach")},
            "weight_decay": sorted({g["weight_decay"] for g in self.optimizer.param_groups}),
            "param_groups": len(self.optimizer.param_groups),
            "clip_grad": self.clip_grad,
            "grad_scaler": self.scaler is not None,
        }

    def state_dict(self) -> dict[str, Any] | None:
        """The loss scaler's state (fp16 on CUDA); None where there is none."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
