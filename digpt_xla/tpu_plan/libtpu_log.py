"""What libtpu's own log says about a compile: how long each stage took and how large the module was.

libtpu logs at INFO, into ``TPU_LOG_DIR`` (``libtpu_compile`` points it at the plan's workdir), the instructions its
HLO passes start from ("running hlo passes for 28,267 instructions") and the duration of each stage of the compile
("BACKEND_PASSES stage duration: 1m41.68s"). It writes the log out by the time the compiling process exits, so this
is read afterwards, by the plan.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_STAGE = re.compile(r"\] ([A-Z_]+) stage duration: ([\d.hmsunµ]+)")
_INSTRUCTIONS = re.compile(r"running hlo passes for ([\d,]+) instructions")
_DURATION_PART = re.compile(r"([\d.]+)(h|ms|us|µs|ns|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
LOG_DIR = "libtpu_logs"  # under the workdir
LATEST = "tpu_driver.INFO"  # libtpu's link to the INFO log of the last process that logged there


def duration_seconds(text: str) -> float:
    """Seconds in a duration as libtpu logs it: ``1m41.679986146s``, ``19.588s``, ``269.87ms``."""
    return sum(float(value) * _SECONDS[unit] for value, unit in _DURATION_PART.findall(text))


def compile_stages(log: str) -> dict[str, Any]:
    """Seconds per stage of the compiles a log records (``hlo_passes``, ``backend_passes``, ``code_generation``,
    ``end_to_end``), summed over its modules, and the largest module's instructions before its HLO passes; empty
    when the log says neither (another libtpu's words)."""
    stages: dict[str, float] = {}
    for name, duration in _STAGE.findall(log):
        stages[name.lower()] = stages.get(name.lower(), 0.0) + duration_seconds(duration)
    found: dict[str, Any] = {"compile_stages": {k: round(v, 1) for k, v in stages.items()}} if stages else {}
    sizes = [int(n.replace(",", "")) for n in _INSTRUCTIONS.findall(log)]
    if sizes:
        found["hlo_instructions"] = max(sizes)
    return found


def read_compile_log(workdir: Path) -> dict[str, Any]:
    """``compile_stages`` of the last compile in ``workdir``; empty when it left no log."""
    latest = workdir / LOG_DIR / LATEST
    return compile_stages(latest.read_text(errors="replace")) if latest.exists() else {}
