"""Numeric settings and attention kernels, and where each may run: the one table that config validation, the
backends, the parity sides and the gap study consult.

A *training* precision covers forward, backward and the optimizer step; a *teacher* precision only a forward pass
under ``no_grad``, so fp16 needs no loss scaler there and runs wherever autocast knows fp16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# fp32; autocast to bf16 / fp16; or TPU emulation (fp32 with every matmul-like op on bf16-rounded operands, as a
# TPU's default precision computes it: digpt_xla.tpu_emulation). Names of torch dtypes, so that reading the table
# (config checks, `digpt --help`) does not import torch.
PRECISIONS: dict[str, str | None] = {
    "fp32": None,
    "bf16": "bfloat16",
    "fp16": "float16",
    "tpu-emulation": None,
}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype ``precision`` autocasts to; None for fp32 and tpu-emulation (which run fp32 tensors)."""
    import torch

    name = PRECISIONS[precision]
    return getattr(torch, name) if name else None


def teacher_precision(teacher: str, training: str) -> str:
    """The teacher's precision: ``auto`` (pretraining's ``teacher.precision``, a parity side's ``teacher=``) follows
    the training precision."""
    return training if teacher == "auto" else teacher


def store_for_autocast(module: torch.nn.Module, precision: str) -> int:
    """Keep a frozen module's matmul weights (its ``matmul_weights()``) in the dtype ``precision`` autocasts to:
    half the memory and the traffic, and the same results, since autocast would cast them at every use. Returns
    the number of weights converted (0 for fp32 and tpu-emulation, or a module that names none)."""
    import torch

    dtype = autocast_dtype(precision)
    named = getattr(module, "matmul_weights", None)
    if dtype is None or not callable(named):
        return 0
    weights = named()
    with torch.no_grad():
        for w in weights:
            w.data = w.data.to(dtype)
    return len(weights)


def stored_bytes(module: torch.nn.Module, precision: str) -> int:
    """The bytes of ``module``'s parameters once ``store_for_autocast`` has stored them for ``precision``."""
    dtype = autocast_dtype(precision)
    named = getattr(module, "matmul_weights", None)
    if dtype is None or not callable(named):
        return sum(p.numel() * p.element_size() for p in module.parameters())
    low = {id(w) for w in named()}
    return sum(p.numel() * (dtype.itemsize if id(p) in low else p.element_size()) for p in module.parameters())


# torch AdamW's kernels (``optim.implementation``), as the keyword arguments that choose each; "auto" leaves the
# choice to the backend (fused on CUDA, the for-loop elsewhere).
ADAMW_KERNELS: dict[str, dict[str, bool]] = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}

BACKEND_NAMES = ("cpu", "cuda", "xla", "xla-spmd")

TRAINING: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "bf16", "tpu-emulation"),
    "cuda": ("fp32", "bf16", "fp16"),
    "xla": ("fp32", "bf16"),
    "xla-spmd": ("fp32", "bf16"),
}
TEACHER: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "bf16", "fp16", "tpu-emulation"),
    "cuda": ("fp32", "bf16", "fp16"),
    "xla": ("fp32", "bf16"),
    "xla-spmd": ("fp32", "bf16"),
}
_WHY = {
    "fp16": "fp16 training needs a loss scaler (torch.amp.GradScaler), which only the cuda backend has",
    "tpu-emulation": "tpu-emulation runs on the cpu backend",
}


def precision_problem(backend: str, precision: str, role: str = "training") -> str | None:
    """Why ``precision`` cannot run as ``role`` ("training" or "teacher") on ``backend``; None when it can.

    ``backend`` "auto" is judged once it is resolved, so it is accepted here."""
    if precision not in PRECISIONS:
        return f"precision {precision!r} is not one of {', '.join(PRECISIONS)}"
    if backend == "auto":
        return None
    table = TRAINING if role == "training" else TEACHER
    if backend not in table:
        return f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKEND_NAMES)}"
    allowed = table[backend]
    if precision in allowed:
        return None
    why = _WHY[precision] if role == "training" else f"{precision} is not available to the teacher on {backend}"
    return f"{why}; as the {role} precision on {backend} use one of {', '.join(allowed)}"


def split_side(text: str) -> tuple[str, str]:
    """``backend:precision`` of a training run, checked against the tables; ValueError naming what is wrong."""
    backend, sep, precision = text.partition(":")
    if not sep or backend not in BACKEND_NAMES or precision not in PRECISIONS:
        raise ValueError(
            f"{text!r} is not backend:precision with backend {'|'.join(BACKEND_NAMES)} and precision "
            f"{'|'.join(PRECISIONS)}"
        )
    problem = precision_problem(backend, precision)
    if problem:
        raise ValueError(f"{text!r}: {problem}")
    return backend, precision


# The student's attention kernels (``model.attention``): torch's SDPA, the explicit softmax(QK^T)V, FlexAttention.
ATTENTION_MODES = ("sdpa", "explicit", "flex")
ATTENTION: dict[str, tuple[str, ...]] = {
    "cpu": ATTENTION_MODES,
    "cuda": ATTENTION_MODES,
    # XLA compiles the step's masked attention itself; FlexAttention's kernels are torch.compile's.
    "xla": ("sdpa", "explicit"),
    "xla-spmd": ("sdpa", "explicit"),
}


def attention_problem(backend: str, mode: str) -> str | None:
    """Why ``model.attention=mode`` cannot run on ``backend``; None when it can ("auto" is judged once resolved)."""
    if mode not in ATTENTION_MODES:
        return f"model.attention={mode!r} is not one of {', '.join(ATTENTION_MODES)}"
    if backend == "auto" or mode in ATTENTION.get(backend, ATTENTION_MODES):
        return None
    runs = ", ".join(name for name, modes in ATTENTION.items() if mode in modes)
    return f"model.attention={mode!r} runs on the {runs} backends; {backend} runs {', '.join(ATTENTION[backend])}"
