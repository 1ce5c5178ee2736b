"""The parallel layout of a run, decided and checked in one place: ``ParallelDims``.

``backend.fsdp`` devices share one copy of the parameters and optimizer state (the ``fsdp`` mesh axis); the rest of
the devices replicate that split and share the batch (the ``data`` axis). What the config alone decides is checked
when it is loaded (``ParallelDims`` without a device count); the device count when the backend starts
(``ParallelDims.on``). Every question of the form "is this run sharded, over how many, where does the teacher go,
which dimension of a weight is split" is a method here, so nothing else compares ``fsdp`` with a number.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..precision import BACKENDS, backends_that

TEACHER_PLACEMENTS = ("auto", "replicated", "fsdp")
# auto splits the teacher only when a whole copy would take more than this share of a device's memory (ViT-H/14
# stored in bf16, 1.26 GB, is 8% of a 16 GB v5e chip: replicated, no collective at all).
TEACHER_REPLICA_SHARE = 0.10


@dataclass(frozen=True)
class ParallelDims:
    """How a run's devices divide the work: ``fsdp`` of them split the parameters, the rest split the batch.

    ``devices`` is None until the runtime has started (the config-time checks); ``what`` names them in errors
    ("processes (torchrun ...)", "devices of the slice")."""

    backend: str
    fsdp: int = 1
    devices: int | None = None
    what: str = "devices"

    def problem(self) -> str | None:
        """Why this layout cannot run; None when it can."""
        if self.fsdp < 1:
            return f"backend.fsdp={self.fsdp}: must be >= 1 (1 = plain data parallelism)"
        if self.sharded and not (self.backend in BACKENDS and BACKENDS[self.backend].shards):
            return (
                f"backend.fsdp={self.fsdp} with backend.name={self.backend!r}: sharding runs on "
                f"{', '.join(backends_that('shards'))} (FSDPv2 on TPU; FSDP2 under torchrun); name one of them"
            )
        if self.devices is not None and self.devices % self.fsdp:
            return (
                f"backend.fsdp={self.fsdp} must be a positive divisor of the {self.devices} {self.what}; the fsdp "
                "axis shards parameters and optimizer state, the remaining factor replicates them (data parallel)"
            )
        return None

    def on(self, devices: int, what: str = "devices") -> ParallelDims:
        """This layout over ``devices`` started devices (or processes), checked: ValueError naming what is wrong."""
        dims = replace(self, devices=devices, what=what)
        problem = dims.problem()
        if problem:
            raise ValueError(problem)
        return dims

    @property
    def sharded(self) -> bool:
        """Parameters and optimizer state are split over devices (checkpoints are then sharded: DCP)."""
        return self.fsdp > 1

    @property
    def data(self) -> int:
        """How many ways the batch is split (the data axis of the mesh); needs ``devices``."""
        if self.devices is None:
            raise ValueError("the data-parallel degree is known once the runtime has started (ParallelDims.on)")
        return self.devices // self.fsdp

    @property
    def mesh_shape(self) -> tuple[int, int]:
        """(data, fsdp)."""
        return self.data, self.fsdp

    def spawn_problem(self, config: str) -> str | None:
        """Why this run cannot be started one process per chip (``xla_spawn``); None when it can."""
        caps = BACKENDS.get(self.backend)
        if (caps is None or caps.one_process_per_chip) and not self.sharded:
            return None
        return (
            f"{config} asks for backend.name={self.backend}, backend.fsdp={self.fsdp}: SPMD runs one process per "
            f"host, so start it with `digpt pretrain --config {config}` on every host instead of one process per chip"
        )

    def finetune_problem(self) -> str | None:
        """Why finetuning cannot run on this layout; None when it can."""
        if not self.sharded:
            return None
        return (
            f"backend.fsdp={self.fsdp}: finetuning runs data parallel (the classifier and its EMA fit one device at "
            "every published size); set backend.fsdp=1"
        )

    def placement_problem(self, placement: str) -> str | None:
        """Why ``teacher.placement=placement`` cannot run on this layout; None when it can."""
        if placement not in TEACHER_PLACEMENTS:
            return f"teacher.placement={placement!r}: one of {', '.join(TEACHER_PLACEMENTS)}"
        if placement == "fsdp" and not self.sharded:
            return "teacher.placement=fsdp splits the teacher over the student's fsdp axis: it needs backend.fsdp > 1"
        return None

    def teacher_placement(self, placement: str, teacher_bytes: int, device_bytes: int | None) -> str:
        """Where the frozen teacher lives (``teacher.placement=placement`` resolved): ``replicated`` (a whole copy
        per device, no collective) or ``fsdp`` (split like the student, gathered block by block). ``auto``
        replicates unless the student is split and a copy of the teacher (as stored) would take more than
        ``TEACHER_REPLICA_SHARE`` of a device's memory."""
        if not self.sharded or placement == "replicated":
            return "replicated"
        if placement == "fsdp":
            return "fsdp"
        if device_bytes is None:
            return "replicated"
        return "fsdp" if teacher_bytes > TEACHER_REPLICA_SHARE * device_bytes else "replicated"

    def split_dim(self, shape: tuple[int, ...]) -> int | None:
        """The dimension of a parameter of ``shape`` split over the fsdp axis: the first when the fsdp size divides
        it, else the largest it divides; None (replicated) when none does or the run is not sharded. The first:
        libtpu fuses a gradient's all-reduce and slice into a reduce-scatter only for a split of the major dimension
        (a [64, 256] weight split on its 256 columns was all-reduced whole)."""
        if not self.sharded:
            return None
        dims = [d for d in sorted(range(len(shape)), key=lambda d: (d > 0, -shape[d])) if shape[d] % self.fsdp == 0]
        return dims[0] if dims else None


def blocks_problem(backend: str, scan: str) -> str | None:
    """Why ``backend.scan`` cannot run on ``backend``; None when it can. (``backend.remat`` runs everywhere: inside
    the scanned loop, or block by block under a checkpoint.)"""
    if scan == "always" and backend in BACKENDS and not BACKENDS[backend].scans:
        return (
            f"backend.scan=always with backend.name={backend!r}: scanned blocks are XLA loops "
            f"({', '.join(backends_that('scans'))})"
        )
    return None
