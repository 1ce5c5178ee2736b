"""The parallel layout of a run, decided and checked in one place.

``backend.fsdp`` devices share one copy of the parameters and optimizer state (the ``fsdp`` mesh axis); the rest of
the devices replicate that split and share the batch (the ``data`` axis). What the config alone decides is checked
when it is loaded (``layout_problem`` without a device count); the device count when the backend starts.
"""

from __future__ import annotations

SHARDING_BACKENDS = ("xla-spmd", "cuda", "cpu")  # cpu and cuda: FSDP2 under torchrun; xla-spmd: FSDPv2


def layout_problem(
    backend: str, fsdp: int, teacher_fsdp: int = 0, devices: int | None = None, what: str = "devices"
) -> str | None:
    """Why ``fsdp`` (and ``teacher_fsdp``) cannot run on ``backend`` over ``devices`` (the processes or chips the
    fsdp axis is cut from, described by ``what``); None when they can. ``devices`` None: the config-time checks."""
    if fsdp < 1:
        return f"backend.fsdp={fsdp}: must be >= 1 (1 = plain data parallelism)"
    if fsdp > 1 and backend not in SHARDING_BACKENDS:
        return (
            f"backend.fsdp={fsdp} with backend.name={backend!r}: sharding runs on xla-spmd (TPU), or on cuda / cpu "
            "under torchrun; name one of them"
        )
    if teacher_fsdp not in (0, 1, fsdp):
        return (
            f"teacher.fsdp={teacher_fsdp}: the teacher is split over the student's mesh axis or not at all; use 0 "
            f"(follow backend.fsdp={fsdp}) or 1"
        )
    if devices is not None and devices % fsdp:
        return (
            f"backend.fsdp={fsdp} must be a positive divisor of the {devices} {what}; the fsdp axis shards "
            "parameters and optimizer state, the remaining factor replicates them (data parallel)"
        )
    return None


def mesh_shape(devices: int, fsdp: int) -> tuple[int, int]:
    """(data, fsdp): the mesh of ``devices`` with parameters split over ``fsdp`` of them."""
    return devices // fsdp, fsdp
