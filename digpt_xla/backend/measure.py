"""Measuring a training step apart from running it: per-device memory (CUDA's allocator peak, or the buffer
assignment of an XLA program compiled without running it). Used by ``tools/bench.py memory``."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import BackendError


def cuda_step_memory(device: torch.device, run_step: Callable[[], list[Tensor]]) -> dict[str, Any]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_step()
    torch.cuda.synchronize(device)
    return {"bytes": torch.cuda.max_memory_allocated(device), "source": "torch.cuda.max_memory_allocated"}


def compiled_step_memory(compile_step: Callable[[], None]) -> dict[str, Any]:
    """The per-device bytes of the XLA program that ``compile_step`` compiles, from the buffer-assignment report
    XLA dumps under ``--xla_dump_to`` (which must be in XLA_FLAGS before the runtime starts)."""
    flag = next((f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_dump_to=")), None)
    if flag is None:
        raise BackendError("step memory on XLA needs XLA_FLAGS=--xla_dump_to=DIR set before torch_xla starts")
    dump = flag.split("=", 1)[1]
    before = set(glob.glob(os.path.join(dump, "*buffer-assignment.txt")))
    compile_step()
    reports = sorted(set(glob.glob(os.path.join(dump, "*buffer-assignment.txt"))) - before)
    if not reports:
        raise BackendError(f"XLA wrote no buffer-assignment dump under {dump}")
    step = max((buffer_assignment(path) for path in reports), key=lambda r: r["inputs"] + r["temporaries"])
    return {
        # The step's outputs replace the parameters and moments they update in place (torch_xla donates those
        # input buffers when the step runs), so they add nothing beyond the inputs.
        "bytes": step["inputs"] + step["temporaries"],
        "inputs_bytes": step["inputs"],
        "temporaries_bytes": step["temporaries"],
        "source": "XLA buffer assignment of the compiled per-device step program (inputs + temporaries)",
    }


def buffer_assignment(path: str) -> dict[str, int]:
    """Bytes of the inputs (entry parameters), temporaries and outputs in one of XLA's buffer-assignment dumps,
    whose allocations read ``allocation 6: size 393216, parameter 64, shape |f32[512,192]| ...``."""
    kinds = {"parameter": "inputs", "preallocated-temp": "temporaries", "thread-local": "temporaries"}
    sizes = {"inputs": 0, "temporaries": 0, "outputs": 0}
    with open(path) as f:
        for line in f:
            match = re.match(r"allocation \d+: size (\d+), ([a-z-]+)", line)
            if match:
                sizes[kinds.get(match[2], "outputs")] += int(match[1])
    return sizes
