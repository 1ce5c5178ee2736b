"""A side of a comparison: a backend and a numeric setting, written ``backend:setting`` (``xla:fp32``).

Settings: ``fp32``; ``bf16`` (autocast); ``fp16`` (autocast + GradScaler, CUDA only); ``xla-default``,
``xla-high``, ``xla-highest`` (torch_xla matmul precision, XLA only); ``tpu-emulation`` (CPU only: every
matmul-like op with bf16-rounded operands and fp32 accumulation, see ``digpt_xla.tpu_emulation``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from digpt_xla.backend import Backend, create_backend

SETTINGS = ("fp32", "bf16", "fp16", "xla-default", "xla-high", "xla-highest", "tpu-emulation")
_BACKENDS = ("cpu", "cuda", "xla")
_backend_cache: dict[str, Backend] = {}


class SideError(ValueError):
    pass


@dataclass(frozen=True)
class Side:
    backend: str
    setting: str

    @classmethod
    def parse(cls, text: str) -> Side:
        backend, _, setting = text.partition(":")
        side = cls(backend.strip(), (setting or "fp32").strip())
        if side.backend not in _BACKENDS:
            raise SideError(f"side {text!r}: backend must be one of {', '.join(_BACKENDS)}")
        if side.setting not in SETTINGS:
            raise SideError(f"side {text!r}: setting must be one of {', '.join(SETTINGS)}")
        if side.setting == "tpu-emulation" and side.backend != "cpu":
            raise SideError(f"side {text!r}: tpu-emulation runs on the cpu backend")
        if side.setting.startswith("xla-") and side.backend != "xla":
            raise SideError(f"side {text!r}: {side.setting} is a torch_xla setting; use the xla backend")
        if side.setting == "fp16" and side.backend != "cuda":
            raise SideError(f"side {text!r}: fp16 with loss scaling needs the cuda backend")
        return side

    def __str__(self) -> str:
        return f"{self.backend}:{self.setting}"

    @property
    def autocast_precision(self) -> str:
        return self.setting if self.setting in ("bf16", "fp16", "tpu-emulation") else "fp32"

    def backend_object(self) -> Backend:
        """One backend object per kind per process (an XLA runtime is initialised once)."""
        if self.backend not in _backend_cache:
            _backend_cache[self.backend] = create_backend(self.backend)
        return _backend_cache[self.backend]

    @contextlib.contextmanager
    def numerics(self):
        """The side's numeric context: the backend's autocast (TPU emulation included) or torch_xla's matmul
        precision."""
        backend = self.backend_object()
        with contextlib.ExitStack() as stack:
            stack.enter_context(backend.autocast(self.autocast_precision))
            if self.setting.startswith("xla-"):
                import torch_xla.backends

                previous = torch_xla.backends.get_mat_mul_precision()
                torch_xla.backends.set_mat_mul_precision(self.setting.removeprefix("xla-"))
                stack.callback(torch_xla.backends.set_mat_mul_precision, previous)
            yield
