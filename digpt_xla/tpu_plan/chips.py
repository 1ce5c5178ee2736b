"""Published per-chip figures of Cloud TPU generations, and the range a compiled step's time may fall in.

From Google Cloud's TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), per chip:
peak bf16 FLOP/s, HBM bandwidth, bidirectional ICI bandwidth and ICI ports. v5e: 197 TFLOP/s, 819 GB/s, ICI 400 GB/s
over 4 ports (2D torus). v6e: 918 TFLOP/s, 1638 GB/s, ICI 800 GB/s over 4 ports (2D torus). v5p: 459 TFLOP/s,
2765 GB/s, ICI 1200 GB/s over 6 ports (3D torus). v4: 275 TFLOP/s, 1200 GB/s; its page gives no per-chip ICI figure,
only 1.1 PB/s of all-reduce bandwidth over a 4096-chip pod, so v4's chip is taken as 1.1e15 / 4096 bytes/s over 6
ports (3D mesh).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    bf16_flops: float  # peak bf16 FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # bidirectional, all ports together
    ici_ports: int
    source: str


_DOCS = "https://docs.cloud.google.com/tpu/docs/"
# Keyed by libtpu's device_kind.
# fmt: off
CHIPS: dict[str, Chip] = {
    "TPU v4":      Chip(275e12, 1200e9, 1.1e15 / 4096, 6, _DOCS + "v4"),
    "TPU v5 lite": Chip(197e12, 819e9,  400e9,         4, _DOCS + "v5e"),
    "TPU v5":      Chip(459e12, 2765e9, 1200e9,        6, _DOCS + "v5p"),
    "TPU v6 lite": Chip(918e12, 1638e9, 800e9,         4, _DOCS + "v6e"),
}
# fmt: on


def chips_in(topology: str) -> int:
    """Chips of a topology name such as ``v5e:4x4`` or ``v4:2x2x1``."""
    count = 1
    for d in _dims(topology):
        count *= d
    return count


def _dims(topology: str) -> list[int]:
    return [int(d) for d in topology.partition(":")[2].split("x")]


def ici_ports_used(topology: str, ports: int) -> int:
    """ICI ports of a chip that lead to another chip of the slice: one neighbour along a dimension of 2 chips, two
    along a longer one (a chip inside the line, or any chip of a ring), none along a dimension of 1."""
    return min(ports, sum(0 if d == 1 else 1 if d == 2 else 2 for d in _dims(topology)))


def ici_send_bytes_per_s(chip: Chip, topology: str) -> float:
    """What one chip can send per second over the ICI ports its slice uses: each port carries half its
    bidirectional bandwidth each way."""
    return ici_ports_used(topology, chip.ici_ports) * chip.ici_bytes_per_s / chip.ici_ports / 2


def estimate(plan: dict, topology: str) -> dict | None:
    """The fastest and slowest a compiled step could run on one device, from its FLOPs (loops counted), its wire
    bytes and its HBM traffic: fastest with compute at peak, the wire bytes at the slice's ICI bandwidth and only
    the step's arguments and outputs crossing HBM, all overlapped; slowest with the same compute and wire terms and
    the cost analysis's bytes accessed, one after another. Estimates, not measurements."""
    chip = CHIPS.get(plan.get("device_kind", ""))
    if chip is None or not plan.get("fits"):
        return None
    share = chips_in(topology) / plan["devices"]  # a device is a whole chip (v4 megacore included) on every kind here
    compute = plan["flops"] / (chip.bf16_flops * share)
    network = plan["wire_bytes"] / (ici_send_bytes_per_s(chip, topology) * share) if plan["wire_bytes"] else 0.0
    hbm_least = (plan["argument_bytes"] + plan["output_bytes"]) / (chip.hbm_bytes_per_s * share)
    hbm_most = plan["cost_analysis_bytes_accessed"] / (chip.hbm_bytes_per_s * share)
    fastest, slowest = max(compute, network, hbm_least), compute + network + hbm_most
    images = plan["per_device_batch"] / share  # per chip
    return {
        "fastest_step_seconds": fastest,
        "slowest_step_seconds": slowest,
        "images_per_second_per_chip": [images / slowest, images / fastest],
        "mfu": [compute / slowest, compute / fastest],
        "compute_seconds": compute,
        "ici_seconds": network,
        "hbm_seconds": [hbm_least, hbm_most],
        "ici_send_bytes_per_s": ici_send_bytes_per_s(chip, topology) * share,
        "source": chip.source,
        "note": "estimate from the compiled program and published peaks, not a measurement",
    }
