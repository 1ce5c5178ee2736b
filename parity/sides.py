"""A side of a comparison: a backend and a numeric setting, ``backend:setting``, optionally with the teacher's
precision, ``backend:setting teacher=precision`` (``cpu:fp32 teacher=fp16``).

Settings: ``fp32``; ``bf16`` (autocast); ``fp16`` (autocast + GradScaler, CUDA only); ``xla-default``,
``xla-high``, ``xla-highest`` (torch_xla matmul precision, XLA only); ``tpu-emulation`` (CPU only: every
matmul-like op with bf16-rounded operands and fp32 accumulation, see ``digpt_xla.tpu_emulation``). The teacher's
precision (``input.teacher: clip``) defaults to the side's autocast precision, as ``teacher.precision: auto`` does
in pretraining; where each precision may run comes from ``digpt_xla.precision``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from digpt_xla.backend import Backend, create_backend
from digpt_xla.config import ConfigError
from digpt_xla.errors import UserError
from digpt_xla.precision import PRECISIONS, backends_that, precision_problem, split_side, teacher_precision

XLA_MATMUL_SETTINGS = ("xla-default", "xla-high", "xla-highest")
SETTINGS = (*PRECISIONS, *XLA_MATMUL_SETTINGS)
# A side runs in this process on one device: every backend but the process-wide SPMD mesh.
_BACKENDS = backends_that("one_process_per_chip")
_backends: dict[tuple[str, int], Backend] = {}


def shared_backend(name: str, fsdp: int = 1, compile_cache: str = "") -> Backend:
    """One backend object per (kind, fsdp) in this process, for every side, study and factor: an XLA runtime is
    initialised once."""
    if (name, fsdp) not in _backends:
        _backends[name, fsdp] = create_backend(name, compile_cache, fsdp)
    return _backends[name, fsdp]


class SideError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Side:
    backend: str
    setting: str
    teacher: str = "auto"  # the teacher's precision; auto = the side's autocast precision

    @classmethod
    def parse(cls, text: str) -> Side:
        """``backend[:setting] [teacher=PRECISION]``: a comparison side (the grammar of ``split_spec``, with a
        comparison's settings and no config overrides)."""
        head, overrides = split_spec(text, "side", SideError)
        if head is None or any(not o.startswith("teacher.precision=") for o in overrides):
            raise SideError(f"side {text!r}: backend[:setting] followed only by teacher=PRECISION")
        backend, _, setting = head.partition(":")
        teacher = overrides[-1].partition("=")[2] if overrides else "auto"
        side = cls(backend, setting or "fp32", teacher)
        if side.backend not in _BACKENDS:
            raise SideError(f"side {text!r}: backend must be one of {', '.join(_BACKENDS)}")
        if side.setting not in SETTINGS:
            raise SideError(f"side {text!r}: setting must be one of {', '.join(SETTINGS)}")
        if side.setting in XLA_MATMUL_SETTINGS and side.backend != "xla":
            raise SideError(f"side {text!r}: {side.setting} is a torch_xla setting; use the xla backend")
        problem = precision_problem(side.backend, side.autocast_precision)
        problem = problem or precision_problem(side.backend, side.teacher_precision, role="teacher")
        if problem:
            raise SideError(f"side {text!r}: {problem}")
        return side

    def __str__(self) -> str:
        return f"{self.backend}:{self.setting}" + (f" teacher={self.teacher}" if self.teacher != "auto" else "")

    @property
    def autocast_precision(self) -> str:
        return self.setting if self.setting in PRECISIONS else "fp32"

    @property
    def teacher_precision(self) -> str:
        return teacher_precision(self.teacher, self.autocast_precision)

    def backend_object(self) -> Backend:
        return shared_backend(self.backend)

    @contextlib.contextmanager
    def numerics(self, precision: str | None = None):
        """The side's numeric context: the backend's autocast in ``precision`` (default: the side's; TPU emulation
        included) and torch_xla's matmul precision."""
        backend = self.backend_object()
        with contextlib.ExitStack() as stack:
            stack.enter_context(backend.autocast(precision or self.autocast_precision))
            if self.setting in XLA_MATMUL_SETTINGS:
                stack.enter_context(backend.matmul_precision(self.setting.removeprefix("xla-")))
            yield


@dataclass(frozen=True)
class Factor:
    """One change to the baseline: a backend and precision, and config overrides."""

    name: str
    backend: str
    precision: str
    overrides: tuple[str, ...] = ()


def split_spec(text: str, what: str, error: type[Exception] = ConfigError) -> tuple[str | None, list[str]]:
    """The one grammar of sides and factors: ``[backend:setting] [teacher=P] [section.key=value ...]``. Returns the
    leading ``backend:setting`` (None when the text starts with an override) and the overrides, ``teacher=P``
    spelled as the config key it sets (``teacher.precision=P``)."""
    tokens = text.split()
    if not tokens:
        raise error(f"an empty {what}: give a side (cpu:bf16) or overrides (optim.eps=1e-6)")
    head = tokens.pop(0) if "=" not in tokens[0] else None
    overrides = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if key == "teacher" and sep:
            token = f"teacher.precision={value}"
        elif not sep or "." not in key:
            raise error(f"{what} {text!r}: {token!r} is neither backend:precision nor section.key=value")
        overrides.append(token)
    return head, overrides


def parse_factor(text: str, baseline: Factor | None = None, what: str = "factor") -> Factor:
    """``backend:precision [teacher=P] [section.key=value ...]`` or only overrides (then on the baseline's side)."""
    head, overrides = split_spec(text, what)
    backend, precision = (baseline.backend, baseline.precision) if baseline else ("cpu", "fp32")
    if head is not None:
        try:
            backend, precision = split_side(head)
        except ValueError as e:
            raise ConfigError(f"{what} {text!r}: {e} (nor section.key=value)") from None
    return Factor(text, backend, precision, (*(baseline.overrides if baseline else ()), *overrides))
