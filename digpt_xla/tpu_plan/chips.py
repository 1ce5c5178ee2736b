"""Published per-chip peaks of Cloud TPU generations, and a roofline estimate of a compiled step's time.

Every figure is per chip, from Google Cloud's TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v4,
/v5e, /v5p, /v6e). ICI is the pod's all-reduce bandwidth divided by its chips where the page gives one (v4, v5e,
v6e), else the per-chip interconnect bandwidth (v5p).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    bf16_flops: float  # peak bf16 FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    source: str


_DOCS = "https://docs.cloud.google.com/tpu/docs/"
# Keyed by libtpu's device_kind. (bf16 FLOP/s, HBM B/s, ICI B/s, page): v4 275 TFLOPs, 1200 GBps, all-reduce 1.1
# PB/s over 4096 chips; v5e 197 TFLOPs, 819 GBps, 51.2 TB/s over 256; v5p 459 TFLOPs, 2765 GBps, ICI 4800 Gbps;
# v6e 918 TFLOPs, 1638 GBps, 102.4 TB/s over 256.
# fmt: off
CHIPS: dict[str, Chip] = {
    "TPU v4":      Chip(275e12, 1200e9, 1.1e15 / 4096,   _DOCS + "v4"),
    "TPU v5 lite": Chip(197e12, 819e9,  51.2e12 / 256,   _DOCS + "v5e"),
    "TPU v5":      Chip(459e12, 2765e9, 4800e9 / 8,      _DOCS + "v5p"),
    "TPU v6 lite": Chip(918e12, 1638e9, 102.4e12 / 256,  _DOCS + "v6e"),
}
# fmt: on


def chips_in(topology: str) -> int:
    """Chips of a topology name such as ``v5e:4x4`` or ``v4:2x2x1``."""
    dims = topology.partition(":")[2].split("x")
    count = 1
    for d in dims:
        count *= int(d)
    return count


def estimate(compiled: dict, topology: str) -> dict | None:
    """Step time and MFU of one device from its compiled cost: the larger of compute at peak and HBM traffic at
    full bandwidth, plus the collectives' bytes over ICI (no overlap assumed). An estimate, not a measurement."""
    chip = CHIPS.get(compiled.get("device_kind", ""))
    if chip is None or not compiled.get("fits"):
        return None
    share = chips_in(topology) / compiled["devices"]  # a device is a whole chip, or one of its TensorCores (v4)
    flops, traffic = chip.bf16_flops * share, chip.hbm_bytes_per_s * share
    collective_bytes = sum(c["bytes"] for c in compiled["collectives"].values())
    compute = compiled["flops"] / flops
    memory = compiled["bytes_accessed"] / traffic
    network = collective_bytes / (chip.ici_bytes_per_s * share)
    seconds = max(compute, memory) + network
    return {
        "step_seconds": seconds,
        "compute_seconds": compute,
        "hbm_seconds": memory,
        "ici_seconds": network,
        "mfu": compute / seconds,
        "peak_bf16_flops_per_device": flops,
        "source": chip.source,
        "note": "roofline estimate from libtpu's cost analysis and published peaks; not a measurement",
    }
