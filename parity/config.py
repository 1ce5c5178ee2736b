"""What a parity comparison runs: the model, its inputs, the sides, the optimizer and schedule, the targets."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

from digpt_xla.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    load_dataclass,
    merge_values,
    parse_override,
)
from digpt_xla.config import validate as validate_config

TUNABLE_SECTIONS = ("optim.", "schedule.")


@dataclass
class InputConfig:
    source: str = "random"  # random | digits (digits needs a 32 px model)
    teacher: str = "random"  # random | pixel | clip
    batch_size: int = 2
    clip_model: str = "ViT-B-16"  # input.teacher=clip: the open_clip image tower (random weights from `seed`)


@dataclass
class Tolerances:
    """Targets of a comparison; a None target is measured and shown but not judged."""

    loss_rel: float | None = 1e-6
    grad_cosine_min: float | None = 0.99999
    param_rel: float | None = 1e-6  # all parameters together, relative L2 after one optimizer step
    activation_rel_l2: float | None = 1e-5  # None: localisation is reported but is no pass/fail check
    trajectory_loss_rel: float | None = None  # None: the drift is measured and shown, not judged
    teacher_rel_l2: float | None = None  # input.teacher=clip: teacher tokens of the first batch


def _parity_schedule() -> ScheduleConfig:
    # One "epoch" is the trajectory: the lr starts at optim.lr and follows the cosine of the trajectory's steps.
    return ScheduleConfig(epochs=1.0, warmup_epochs=0.0)


@dataclass
class ParityConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    sides: list[str] = field(default_factory=lambda: ["cpu:fp32", "xla:fp32"])
    steps: int = 10  # trajectory length
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    schedule: ScheduleConfig = field(default_factory=_parity_schedule)
    seed: int = 0
    # Applied to every side after the first, to check that the harness catches it: "module.attr=value" changes a
    # module of the student (blocks.1.norm1.eps=1e-3); "optim.key=value" / "schedule.key=value" that side's
    # optimizer or lr schedule (optim.eps=1e-3).
    perturb: str = ""
    tolerances: Tolerances = field(default_factory=Tolerances)


def load_parity_config(path, overrides=()) -> ParityConfig:
    cfg = load_dataclass(ParityConfig(), path, overrides)
    cfg.model.resolve_attention()
    validate_config(cfg.optim, "optim.")
    validate_config(cfg.schedule, "schedule.")
    if cfg.steps < 1 or cfg.input.batch_size < 1:
        raise ConfigError(f"steps={cfg.steps} and input.batch_size={cfg.input.batch_size} must be >= 1")
    for key, value, choices in (
        ("input.source", cfg.input.source, ("random", "digits")),
        ("input.teacher", cfg.input.teacher, ("random", "pixel", "clip")),
    ):
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    if cfg.perturb.startswith(TUNABLE_SECTIONS):
        side_sections(cfg, perturb=True)  # a bad key fails now, naming it
    for f in dataclasses.fields(Tolerances):
        value = getattr(cfg.tolerances, f.name)
        low, high = (-1.0, 1.0) if f.name == "grad_cosine_min" else (0.0, math.inf)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(
                f"tolerances.{f.name}={value}: must be a finite number in [{low:g}, {high:g}], or null to measure it "
                "without judging"
            )
    return cfg


@dataclass
class _Sections:
    optim: OptimConfig
    schedule: ScheduleConfig


def side_sections(cfg: ParityConfig, perturb: bool) -> tuple[OptimConfig, ScheduleConfig]:
    """The optimizer and schedule sections of one side: the config's, with an optim./schedule. perturbation."""
    sections = _Sections(copy.deepcopy(cfg.optim), copy.deepcopy(cfg.schedule))
    if perturb and cfg.perturb.startswith(TUNABLE_SECTIONS):
        merge_values(sections, parse_override(cfg.perturb), "perturb: ")
        validate_config(sections, "perturb: ")
    return sections.optim, sections.schedule


@dataclass
class AttributionConfig:
    pretrain_config: str = "yaml/demo.yaml"
    overrides: list[str] = field(default_factory=list)  # applied to every side
    baseline: str = "cpu:fp32"
    factors: list[str] = field(default_factory=lambda: ["cpu:tpu-emulation", "cpu:bf16", "model.attention=explicit"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    steps: int = 100
    window: int = 10  # the final loss is the mean of the last `window` steps
    record_every: int = 10  # parameters compared at step 1, every `record_every` steps and at the end
    probe: bool = True
    out_dir: str = "parity/reports/attribution_tiny"  # results.jsonl, report.md, report.json, divergence.png
    run_dir: str = "runs/attribution_tiny"
    ledger: str = ""  # the gap ledger every result also goes to ("" = out_dir/ledger.jsonl)
    alpha: float = 0.05
