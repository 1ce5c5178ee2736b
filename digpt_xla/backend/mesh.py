"""The parallel layout of a run, decided and checked in one place.

``backend.fsdp`` devices share one copy of the parameters and optimizer state (the ``fsdp`` mesh axis); the rest of
the devices replicate that split and share the batch (the ``data`` axis). What the config alone decides is checked
when it is loaded (``layout_problem`` without a device count); the device count when the backend starts.
"""

from __future__ import annotations

SHARDING_BACKENDS = ("xla-spmd", "cuda", "cpu")  # cpu and cuda: FSDP2 under torchrun; xla-spmd: FSDPv2


TEACHER_PLACEMENTS = ("auto", "replicated", "fsdp")
# auto splits the teacher only when a whole copy would take more than this share of a device's memory (ViT-H/14
# stored in bf16, 1.26 GB, is 8% of a 16 GB v5e chip: replicated, no collective at all).
TEACHER_REPLICA_SHARE = 0.10


def layout_problem(
    backend: str, fsdp: int, teacher_placement: str = "auto", devices: int | None = None, what: str = "devices"
) -> str | None:
    """Why ``fsdp`` (and the teacher's placement) cannot run on ``backend`` over ``devices`` (the processes or chips
    the fsdp axis is cut from, described by ``what``); None when they can. ``devices`` None: the config-time
    checks."""
    if fsdp < 1:
        return f"backend.fsdp={fsdp}: must be >= 1 (1 = plain data parallelism)"
    if fsdp > 1 and backend not in SHARDING_BACKENDS:
        return (
            f"backend.fsdp={fsdp} with backend.name={backend!r}: sharding runs on xla-spmd (TPU), or on cuda / cpu "
            "under torchrun; name one of them"
        )
    if teacher_placement not in TEACHER_PLACEMENTS:
        return f"teacher.placement={teacher_placement!r}: one of {', '.join(TEACHER_PLACEMENTS)}"
    if teacher_placement == "fsdp" and fsdp == 1:
        return "teacher.placement=fsdp splits the teacher over the student's fsdp axis: it needs backend.fsdp > 1"
    if devices is not None and devices % fsdp:
        return (
            f"backend.fsdp={fsdp} must be a positive divisor of the {devices} {what}; the fsdp axis shards "
            "parameters and optimizer state, the remaining factor replicates them (data parallel)"
        )
    return None


SCANNING_BACKENDS = ("xla", "xla-spmd")


def blocks_problem(backend: str, scan: str) -> str | None:
    """Why ``backend.scan`` cannot run on ``backend``; None when it can. (``backend.remat`` runs everywhere: inside
    the scanned loop, or block by block under a checkpoint.)"""
    if scan == "always" and backend not in (*SCANNING_BACKENDS, "auto"):
        return f"backend.scan=always with backend.name={backend!r}: scanned blocks are XLA loops (xla, xla-spmd)"
    return None


def mesh_shape(devices: int, fsdp: int) -> tuple[int, int]:
    """(data, fsdp): the mesh of ``devices`` with parameters split over ``fsdp`` of them."""
    return devices // fsdp, fsdp


def teacher_placement(placement: str, fsdp: int, teacher_bytes: int, device_bytes: int | None) -> str:
    """Where the frozen teacher lives: ``replicated`` (a whole copy per device, no collective) or ``fsdp`` (split
    like the student, gathered block by block). ``auto`` replicates unless the student is split and a copy of the
    teacher (as stored) would take more than ``TEACHER_REPLICA_SHARE`` of a device's memory."""
    if fsdp == 1 or placement == "replicated":
        return "replicated"
    if placement == "fsdp":
        return "fsdp"
    if device_bytes is None:
        return "replicated"
    return "fsdp" if teacher_bytes > TEACHER_REPLICA_SHARE * device_bytes else "replicated"
