"""A backend's numerics: which precisions and attention modes it runs, its autocast, loss scaling and AdamW
kernel options (the rules themselves are tables in ``digpt_xla.precision``)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ..precision import ADAMW_KERNELS, PRECISIONS, attention_problem, autocast_dtype, precision_problem, tf32_problem
from .errors import BackendError


class Numerics:
    """The numeric part of a ``Backend``."""

    name: str
    device: torch.device

    # torch AdamW's kernels a run may ask for (``optim.implementation``); "auto" is the backend's own choice.
    optimizer_implementations: tuple[str, ...] = ("auto", *ADAMW_KERNELS)

    def check_precision(self, precision: str, role: str = "training") -> None:
        """Refuse a precision this backend cannot run as ``role`` ("training" or "teacher"), naming the ones it can."""
        problem = precision_problem(self.name, precision, role)
        if problem:
            raise BackendError(problem)

    def set_tf32(self, enabled: bool) -> None:
        """TF32 tensor-core math for fp32 matmuls and convolutions (``backend.tf32``): an NVIDIA mode."""
        problem = tf32_problem(self.name) if enabled else None
        if problem:
            raise BackendError(problem)

    def check_attention(self, mode: str) -> None:
        """Refuse an attention mode (``model.attention``) this backend cannot run."""
        problem = attention_problem(self.name, mode)
        if problem:
            raise BackendError(problem)

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """The numeric context of a forward pass; callers check the precision for their role first."""
        if precision not in PRECISIONS:
            raise BackendError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision == "tpu-emulation":
            from ..tpu_emulation import tpu_matmul_emulation

            return tpu_matmul_emulation()
        dtype = autocast_dtype(precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def matmul_precision(self, level: str) -> contextlib.AbstractContextManager:
        """torch_xla's matmul precision (``default``, ``high``, ``highest``) for a block; only XLA has it."""
        raise BackendError(f"matmul precision {level!r} is a torch_xla setting; the {self.name} backend has none")

    def grad_scaler(self, precision: str) -> torch.amp.GradScaler | None:
        self.check_precision(precision)
        return None

    def optimizer_options(self, implementation: str = "auto") -> dict[str, Any]:
        """Keyword arguments of torch's AdamW here: the backend's own (``auto``), or the kernel asked for."""
        options = self._optimizer_defaults()
        if implementation == "auto":
            return options
        if implementation not in self.optimizer_implementations:
            raise BackendError(
                f"optim.implementation={implementation!r} cannot run on {self.name}; choose one of "
                f"{', '.join(self.optimizer_implementations)}"
            )
        kept = {k: v for k, v in options.items() if k not in ("foreach", "fused")}
        return kept | ADAMW_KERNELS[implementation]

    def _optimizer_defaults(self) -> dict[str, Any]:
        return {}  # torch's own choice: the for-loop kernel for CPU tensors

    def learning_rate(self, value: float) -> float | Tensor:
        """The learning rate in the form this backend's optimizer takes it."""
        return value
