"""The backends, numeric settings and attention kernels, and what each backend can run: the one table
(``BACKENDS``) that config validation, backend creation, the parity sides and the gap study consult.

A *training* precision covers forward, backward and the optimizer step; a *teacher* precision only a forward pass
under ``no_grad``, so fp16 needs no loss scaler there and runs wherever autocast knows fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
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

# The student's attention kernels (``model.attention``): torch's SDPA, the explicit softmax(QK^T)V, FlexAttention.
ATTENTION_MODES = ("sdpa", "explicit", "flex")


@dataclass(frozen=True)
class BackendCapabilities:
    """What one backend is and can run: the one place a backend's name is written."""

    module: str  # where its class lives, under digpt_xla.backend (imported only when the backend is created)
    cls: str
    training: tuple[str, ...]  # training precisions
    teacher: tuple[str, ...]  # teacher (forward-only) precisions
    attention: tuple[str, ...]  # the student's attention kernels
    shards: bool  # backend.fsdp > 1: FSDP2 under torchrun (cpu, cuda), FSDPv2 (xla-spmd)
    scans: bool  # backend.scan: scanned blocks are XLA loops
    one_process_per_chip: bool  # started per chip (torchrun, xla_spawn); False: one process per host (SPMD)
    tf32: bool = False  # backend.tf32 is an NVIDIA mode


BACKENDS: dict[str, BackendCapabilities] = {
    "cpu": BackendCapabilities(
        "base", "Backend", ("fp32", "bf16", "tpu-emulation"), ("fp32", "bf16", "fp16", "tpu-emulation"),
        ATTENTION_MODES, shards=True, scans=False, one_process_per_chip=True,
    ),
    "cuda": BackendCapabilities(
        "base", "CudaBackend", ("fp32", "bf16", "fp16"), ("fp32", "bf16", "fp16"), ATTENTION_MODES,
        shards=True, scans=False, one_process_per_chip=True, tf32=True,
    ),
    # XLA compiles the step's masked attention itself; FlexAttention's kernels are torch.compile's.
    "xla": BackendCapabilities(
        "xla", "XlaBackend", ("fp32", "bf16"), ("fp32", "bf16"), ("sdpa", "explicit"),
        shards=False, scans=True, one_process_per_chip=True,
    ),
    "xla-spmd": BackendCapabilities(
        "xla", "XlaSpmdBackend", ("fp32", "bf16"), ("fp32", "bf16"), ("sdpa", "explicit"),
        shards=True, scans=True, one_process_per_chip=False,
    ),
}  # fmt: skip
BACKEND_NAMES = tuple(BACKENDS)


def backends_that(can: str) -> tuple[str, ...]:
    """The backends whose capability ``can`` (a ``BackendCapabilities`` flag) is set."""
    return tuple(name for name, caps in BACKENDS.items() if getattr(caps, can))


def tf32_problem(backend: str) -> str | None:
    """Why ``backend.tf32=true`` cannot run on ``backend``; None when it can ("auto" is judged once resolved)."""
    if backend not in BACKENDS or BACKENDS[backend].tf32:
        return None
    return (
        f"backend.tf32=true with backend.name={backend!r}: TF32 is an NVIDIA tensor-core mode "
        f"({', '.join(backends_that('tf32'))})"
    )


def unknown_backend(name: str) -> str:
    return f"unknown backend {name!r}; choose one of auto, {', '.join(BACKEND_NAMES)}"


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
    if backend not in BACKENDS:
        return unknown_backend(backend)
    allowed = BACKENDS[backend].training if role == "training" else BACKENDS[backend].teacher
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


def attention_problem(backend: str, mode: str) -> str | None:
    """Why ``model.attention=mode`` cannot run on ``backend``; None when it can ("auto" is judged once resolved)."""
    if mode not in ATTENTION_MODES:
        return f"model.attention={mode!r} is not one of {', '.join(ATTENTION_MODES)}"
    if backend not in BACKENDS or mode in BACKENDS[backend].attention:
        return None  # "auto" is judged once resolved; an unknown name is reported by the precision check
    runs = ", ".join(name for name, caps in BACKENDS.items() if mode in caps.attention)
    here = ", ".join(BACKENDS[backend].attention)
    return f"model.attention={mode!r} runs on the {runs} backends; {backend} runs {here}"
