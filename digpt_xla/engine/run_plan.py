"""What a run does, resolved: the config says ``auto`` in many places (the backend, the teacher's precision and
placement, the AdamW kernel, the learning rate from ``blr``, the accumulation from ``effective_batch``); the run
plan holds what each became on this runtime. It is built once, when the trainer is set up, printed at the start,
written into ``run.json`` and into every checkpoint beside the config as written, so that a checkpoint says what
ran, not only what was asked for."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, OptimConfig
from .schedule import StepPlan, base_lr


@dataclass(frozen=True)
class RunPlan:
    kind: str  # pretrain | finetune
    backend: str  # the backend that runs (backend.name=auto resolved)
    processes: int
    devices: int  # all devices of the run
    data_parallel: int  # the batch is split this many ways
    fsdp: int  # parameters and AdamW state split this many ways
    precision: str
    adamw: str  # the AdamW kernel: for-loop | foreach | fused (optim.implementation=auto resolved), capturable
    blocks: str  # how stacks of blocks run: in order, scanned (XLA loops), rematerialised
    batch_per_device: int
    accumulation: int
    effective_batch: int
    lr: float  # the peak learning rate (optim.lr, or optim.blr x effective batch / 256)
    steps_per_epoch: int
    total_steps: int
    warmup_steps: float  # warmup_epochs x steps per epoch (a fraction of a step is kept: the lr ramps by it)
    end_step: int  # where it stops (schedule.max_steps, or the end of the schedule)
    start_step: int = 0  # where this invocation starts (a resumed run: the checkpoint's step)
    teacher_precision: str | None = None  # pretraining: teacher.precision=auto resolved
    teacher_placement: str | None = None  # pretraining: teacher.placement=auto resolved (replicated | fsdp)
    attention: str | None = None  # pretraining: the student's attention kernel

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The plan as the one line a run starts with."""
        layout = f"{self.devices} device{'s' * (self.devices > 1)}, {self.processes} process"
        layout += f"{'es' * (self.processes > 1)}: data {self.data_parallel} x fsdp {self.fsdp}"
        teacher = (
            f", teacher {self.teacher_precision} {self.teacher_placement}" if self.teacher_precision is not None else ""
        )
        attention = f" | attention {self.attention}" if self.attention else ""
        return (
            f"{self.kind} on {self.backend} ({layout}) | {self.precision}{teacher}{attention} | AdamW {self.adamw} | "
            f"blocks {self.blocks} | batch {self.batch_per_device}/device x {self.accumulation} accumulation = "
            f"{self.effective_batch} | lr {self.lr:.3g} | steps {self.start_step}..{self.end_step} of "
            f"{self.total_steps} (warmup {self.warmup_steps:g})"
        )


def adamw_kernel(options: dict[str, Any]) -> str:
    """The kernel torch's AdamW runs with ``options`` (a param group's), as ``optim.implementation`` names it."""
    kernel = "fused" if options.get("fused") else "foreach" if options.get("foreach") else "for-loop"
    return kernel + (", capturable" if options.get("capturable") else "")


REMAT_PER_BLOCK = "remat per block"  # how ``blocks_mode`` says the student's blocks are rematerialised


def blocks_mode(scan_teacher: bool, scan_student: bool, remat: str) -> str:
    scanned = [name for name, on in (("teacher", scan_teacher), ("student", scan_student)) if on]
    how = f"scanned ({' and '.join(scanned)})" if scanned else "in order"
    return how + (f", {REMAT_PER_BLOCK}" if remat == "blocks" else "")


def rematerialised(blocks: str) -> bool:
    """Whether a run plan's ``blocks`` (as ``blocks_mode`` wrote it, in a plan's JSON too) rematerialises."""
    return blocks.endswith(REMAT_PER_BLOCK)


def batch_layout(batch_per_device: int, optim: OptimConfig, devices: int) -> Layout:
    """``data.batch_size`` on each of ``devices``, accumulated to ``optim.effective_batch`` (or ``accum_steps``
    times), and the peak lr that batch gives (``optim.lr``, or ``optim.blr`` scaled)."""
    accumulation = accumulation_steps(optim.accum_steps, optim.effective_batch, batch_per_device * devices)
    effective = batch_per_device * devices * accumulation
    return Layout(batch_per_device, accumulation, effective, base_lr(optim, effective))


def accumulation_steps(accum_steps: int, effective_batch: int | None, global_micro_batch: int) -> int:
    if effective_batch is None:
        return accum_steps
    if effective_batch % global_micro_batch:
        raise ConfigError(
            f"optim.effective_batch={effective_batch} is not a multiple of the global micro-batch "
            f"{global_micro_batch} (data.batch_size x devices); change one of them"
        )
    return effective_batch // global_micro_batch


@dataclass(frozen=True)
class Layout:
    """How a step's samples add up: per device, accumulated, in all; and the peak learning rate they imply."""

    batch_per_device: int
    accumulation: int
    effective_batch: int
    lr: float


def resolve_plan(
    kind: str,
    backend: Any,
    precision: str,
    optimizer: torch.optim.Optimizer,
    layout: Layout,
    steps: StepPlan,
    details: dict[str, Any],
) -> RunPlan:
    """The plan of a set-up trainer: its backend as started, its optimizer as built, its steps as planned."""
    b = backend
    return RunPlan(
        kind=kind,
        backend=b.name,
        processes=b.world_size,
        devices=b.global_devices,
        data_parallel=b.dims.data,
        fsdp=b.dims.fsdp,
        precision=precision,
        adamw=adamw_kernel(optimizer.param_groups[0]),
        blocks=blocks_mode(b.scan_blocks, b.scan_trains, b.remat),
        **dataclasses.asdict(layout),
        steps_per_epoch=steps.steps_per_epoch,
        total_steps=steps.total_steps,
        warmup_steps=steps.warmup_steps,
        end_step=steps.end_step,
        **details,
    )
