"""Emulation of TPU default matmul precision on the CPU.

A TPU runs an fp32 matmul at default precision as one bf16 pass: both operands are rounded to bf16 (8
mantissa bits) and the products are accumulated in fp32. A product of two bf16 values is exact in fp32, so
rounding the operands and multiplying in fp32 reproduces that arithmetic up to accumulation order, at fp32
speed (real bf16 matmuls are ~600x slower on these CPUs).

``tpu_matmul_emulation()`` is a TorchFunctionMode that does this for every matmul-like op (linear, matmul,
mm, bmm, addmm, baddbmm, einsum, conv, scaled-dot-product attention) in the forward pass and, through
straight-through autograd functions, for the matmuls of the backward pass: the gradient flowing into each of
those ops is rounded as well. Everything else (LayerNorm, softmax, GELU, additions) stays fp32.

Training uses it as ``backend.precision=tpu-emulation`` on the cpu backend (``Backend.autocast``); the parity
harness as the side setting ``cpu:tpu-emulation``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def round_bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


class _RoundOperand(torch.autograd.Function):
    """Forward: round to bf16. Backward: identity (the rounding is part of the op, not of the model)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return round_bf16(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _RoundIncomingGrad(torch.autograd.Function):
    """Forward: identity. Backward: round the gradient, the operand of the op's backward matmuls."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return round_bf16(grad)


def _operand(x):
    if isinstance(x, Tensor) and x.is_floating_point() and x.dtype == torch.float32:
        return _RoundOperand.apply(x)
    return x


def _output(y):
    if isinstance(y, Tensor) and y.is_floating_point() and y.requires_grad:
        return _RoundIncomingGrad.apply(y)
    return y


_MATMUL_OPERANDS = {  # function -> number of leading positional tensor operands to round
    F.linear: 2,  # input, weight (bias is an addition)
    torch.matmul: 2,
    Tensor.matmul: 2,
    Tensor.__matmul__: 2,
    Tensor.__rmatmul__: 2,
    torch.mm: 2,
    Tensor.mm: 2,
    torch.bmm: 2,
    Tensor.bmm: 2,
    F.conv1d: 2,
    F.conv2d: 2,
    F.conv3d: 2,
}
_ADD_MATMUL = {torch.addmm: 3, torch.baddbmm: 3, Tensor.addmm: 3, Tensor.baddbmm: 3}  # (bias, a, b)


def _emulated_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """SDPA spelt out so that both of its products (q k^T and p v) take bf16-rounded operands."""
    if dropout_p or is_causal or kwargs.get("enable_gqa"):
        raise NotImplementedError("tpu emulation of SDPA supports attn_mask only (no dropout, causal or GQA)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = _output(torch.matmul(_operand(q), _operand(k).transpose(-2, -1))) * scale
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    return _output(torch.matmul(_operand(scores.softmax(dim=-1)), _operand(v)))


class tpu_matmul_emulation(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch modes
    """Within this context every fp32 matmul-like op runs with bf16-rounded operands (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _emulated_attention(*args, **kwargs)
        n = _MATMUL_OPERANDS.get(func)
        if n is not None:
            args = tuple(_operand(a) if i < n else a for i, a in enumerate(args))
            return _output(func(*args, **kwargs))
        if func in _ADD_MATMUL:
            args = tuple(_operand(a) if i in (1, 2) else a for i, a in enumerate(args))
            return _output(func(*args, **kwargs))
        if func is torch.einsum:
            equation, *operands = args
            if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = list(operands[0])
            return _output(func(equation, *[_operand(o) for o in operands], **kwargs))
        return func(*args, **kwargs)
