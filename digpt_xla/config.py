"""Run configuration: nested dataclasses, loaded from YAML with ``a.b=value`` overrides (``yaml_dataclass``).

Every section is a dataclass; unknown keys and values of the wrong type fail with a message naming the key,
the value, the expected type and the closest valid keys. Once loaded, every numeric and list field is checked
against its allowed range (``RULES``), so a bad value fails at load time naming the key, never deep inside a run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .backend.mesh import TEACHER_PLACEMENTS, ParallelDims, blocks_problem
from .config_rules import Rule, balanced_braces, check_fields, number_rule, two_betas
from .precision import (
    ADAMW_KERNELS,
    ATTENTION_MODES,
    BACKEND_NAMES,
    PRECISIONS,
    attention_problem,
    precision_problem,
    teacher_precision,
    tf32_problem,
)
from .yaml_dataclass import ConfigError, load_dataclass, merge_values, parse_override

__all__ = [
    "BackendConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "OptimConfig",
    "ProbeConfig",
    "RULES",
    "RunConfig",
    "ScheduleConfig",
    "TeacherConfig",
    "load_config",
    "load_dataclass",
    "merge_values",
    "parse_override",
    "validate",
]


@dataclass
class ModelConfig:
    """A named size (see ``digpt_xla.models.MODEL_SIZES``) and optional shape overrides (None: the size's)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"attention": ATTENTION_MODES}

    name: str = "digpt_tiny"  # a named size: digpt_tiny, digpt_vit_{small,base,large}_patch16_224, ..._huge_patch14_224
    img_size: int | None = None  # input resolution in pixels (None: the size's)
    patch_size: int | None = None  # pixels per patch side
    embed_dim: int | None = None  # encoder width
    depth: int | None = None  # encoder blocks
    num_heads: int | None = None  # encoder attention heads
    decoder_dim: int | None = None  # width of the AR and KD decoders
    decoder_depth: int | None = None  # blocks of each decoder
    decoder_heads: int | None = None  # attention heads of each decoder
    segments_per_side: int | None = None  # the image is cut into segments_per_side^2 segments for the AR order
    feature_taps: list[int] | None = None  # encoder blocks whose outputs the decoders read
    attention: str = "sdpa"  # sdpa | explicit | flex (BlockMask; cpu/cuda, best under backend.compile=true)
    fused_attention: bool | None = None  # deprecated: true = attention sdpa, false = explicit

    def resolve_attention(self) -> str:
        """Fold the deprecated ``fused_attention`` boolean of older configs into ``attention``; returns the mode."""
        if self.fused_attention is not None:
            legacy = "sdpa" if self.fused_attention else "explicit"
            if self.attention not in ("sdpa", legacy):
                raise ConfigError(
                    f"model.fused_attention={self.fused_attention} contradicts model.attention="
                    f"{self.attention!r}; drop model.fused_attention (deprecated)"
                )
            self.attention, self.fused_attention = legacy, None
        return self.attention

    def shape_overrides(self) -> dict[str, Any]:
        skip = {"name", "attention", "fused_attention"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


@dataclass
class TeacherConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "kind": ("pixel", "clip"),
        "precision": ("auto", *PRECISIONS),
        "placement": TEACHER_PLACEMENTS,
    }
    kind: str = "pixel"  # pixel | clip
    clip_model: str = "ViT-H-14"  # open_clip architecture of the clip teacher
    checkpoint: str = ""  # local path or fsspec URL (gs://...) of open_clip weights
    precision: str = "auto"  # auto (the training precision) | fp32 | bf16 | fp16
    # auto | replicated (a whole copy per device) | fsdp (split like the student); auto splits it only when a copy
    # would take over 10% of a device's memory
    placement: str = "auto"


@dataclass
class DataConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"source": ("digits", "synthetic", "imagefolder", "webdataset")}
    source: str = "digits"  # digits | synthetic | imagefolder | webdataset
    batch_size: int = 64  # per device (per process on multi-process backends)
    num_workers: int = 0  # data loader worker processes (0: in the training process)
    root: str = ""  # imagefolder: ImageNet-layout directory root/<class>/<image>
    urls: str = ""  # webdataset: brace-expanded shard URLs (local, gs://, memory://), several joined by "::"
    resampled: bool = True  # webdataset: draw shards with replacement; every rank runs the same steps per epoch
    shuffle_buffer: int = 5000  # webdataset: samples mixed across shards before decoding
    samples_per_epoch: int | None = None  # webdataset: None = the sum of manifest.json's counts
    num_classes: int | None = None  # webdataset: labels outside [0, num_classes) are skipped (None: manifest's)
    read_timeout: float = 120.0  # seconds a shard open or read may stall before the run fails with a clear error
    synthetic_size: int = 4096  # samples of the synthetic source
    train_fraction: float = 0.8  # digits: the rest is held out for kNN evaluation
    min_scale: float | None = None  # RandomResizedCrop lower scale; None: 0.2 (the release) or 0.6 for digits
    hflip: bool = True  # horizontal flip for imagefolder/webdataset (never for digits: they are chiral)


@dataclass
class OptimConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"implementation": ("auto", *ADAMW_KERNELS)}
    blr: float = 1.5e-4  # lr = blr * effective batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0  # the cosine schedule's floor
    weight_decay: float = 0.05  # AdamW's, on weights only (not biases, norms, tokens)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's moment decays
    eps: float = 1e-8  # AdamW's denominator term
    clip_grad: float | None = None  # max global gradient norm (None: no clipping)
    accum_steps: int = 1  # micro-batches per optimizer step
    effective_batch: int | None = None  # when set, accum_steps = effective_batch / (batch_size x devices)
    # torch AdamW's kernel: auto (the backend's: fused on CUDA, the for-loop elsewhere) | for-loop | foreach | fused
    implementation: str = "auto"


@dataclass
class ScheduleConfig:
    epochs: float = 300.0  # length of the schedule
    warmup_epochs: float = 40.0  # linear lr warmup before the cosine decay
    steps_per_epoch: int | None = None  # None: the data source's length / global batch
    max_steps: int | None = None  # stop early (smoke tests); the schedule still spans `epochs`


@dataclass
class BackendConfig:
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "name": ("auto", *BACKEND_NAMES),
        "precision": tuple(PRECISIONS),
        "scan": ("auto", "always", "never"),
        "remat": ("none", "blocks"),
    }
    name: str = "auto"  # auto | cpu | cuda | xla | xla-spmd
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only, with a GradScaler) | tpu-emulation (cpu only)
    compile_cache: str = ""  # XLA persistent compile cache directory ("" = off)
    compile: bool = False  # torch.compile student and teacher (cuda/cpu; XLA compiles the step anyway)
    tf32: bool = False  # cuda: TF32 tensor-core math for fp32 matmuls and convolutions (off: fp32 means fp32)
    # Size of the mesh axis that parameters and AdamW state are split over (FSDPv2 on xla-spmd, FSDP2 on
    # cuda/cpu under torchrun); the other devices replicate them. 1 = plain data parallelism.
    fsdp: int = 1
    # auto | always | never: on xla and xla-spmd the teacher's tower, and the student's encoder and decoders when
    # they are rematerialised (auto) or always, run as XLA loops over their stacked weights (one block compiled, not
    # each); eager backends run blocks one by one
    scan: str = "auto"
    # none | blocks: keep only the input of each student block (encoder and decoders) and recompute its
    # activations in the backward pass
    remat: str = "none"


@dataclass
class RunConfig:
    out_dir: str = "runs/default"  # run directory: local path or fsspec URL (gs://...)
    seed: int = 0  # initial weights (and, unless data_seed is set, the data)
    data_seed: int | None = None  # data order, augmentations and segment orders; None: seed
    log_every: int = 10  # steps per metrics.jsonl / TensorBoard record (the mean over them)
    ckpt_every: int = 500  # optimizer steps between checkpoints (0 = only at the end)
    keep_last: int = 3  # checkpoints kept (older ones are removed)
    resume: str = "auto"  # auto | never | a checkpoint path
    # a new run in a directory that holds another run's logs or checkpoints: false refuses; true moves them to
    # previous/<time>/ inside it first (nothing is deleted)
    overwrite: bool = False
    progress: bool = True  # a tqdm progress bar
    knn_eval: bool = False  # kNN accuracy of the encoder before and after (sources with labels)

    @property
    def order_seed(self) -> int:
        """The seed of everything the data decides (order, augmentation, segment orders)."""
        return self.seed if self.data_seed is None else self.data_seed


@dataclass
class ProbeConfig:
    """``digpt probe``: kNN and/or a linear classifier on frozen encoder features."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"kind": ("knn", "linear", "both")}

    checkpoint: str = ""  # pretraining checkpoint (ours or the release's); "" = the randomly initialised encoder
    kind: str = "both"  # knn | linear | both (features in fp32 on the backend backend.name names; probes on the host)
    k: int = 20  # kNN neighbours
    temperature: float = 0.07  # kNN vote weighting exp(cos / temperature)
    epochs: int = 100  # linear probe
    lr: float = 0.1  # linear probe
    weight_decay: float = 0.0  # linear probe
    batch_size: int = 256  # feature extraction and linear probe
    val_root: str = ""  # imagefolder: held-out folder (data.root is the training side)


@dataclass
class FinetuneConfig:
    """``digpt finetune``: the release's recipe (README, "Finetuning") on a timm ViT with the encoder's shape."""

    checkpoint: str = ""  # pretraining checkpoint (ours or the release's); "" = from scratch
    num_classes: int = 1000  # classifier outputs
    val_root: str = ""  # imagefolder: the evaluation folder
    drop_path: float = 0.1  # stochastic depth rate
    layer_decay: float = 0.65  # layer-wise lr decay
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    smoothing: float = 0.1  # label smoothing
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # imagefolder only ("" = off)
    reprob: float = 0.25  # random erasing, imagefolder only
    ema: bool = False  # keep an exponential moving average of the weights and evaluate it too
    ema_decay: float = 0.9999  # the EMA's decay per step
    eval_batch_size: int = 256  # evaluation batch
    eval_every_epochs: int = 1  # evaluate (top-1, top-5, EMA) every N epochs and at the end; 0 = at the end only


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    run: RunConfig = field(default_factory=RunConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The run configuration: defaults, then the YAML file, then the overrides, then the range checks."""
    cfg = load_dataclass(Config(), path, overrides)
    validate(cfg)  # the key is named; the value may come from the file or an override
    return cfg


# ---------------------------------------------------------------------------------------------- range checks
def _model_name(v: Any) -> bool:
    from .models import MODEL_SIZES

    return v in MODEL_SIZES


def _model_names() -> str:
    from .models import MODEL_SIZES

    return "one of " + ", ".join(MODEL_SIZES)


POSITIVE_INT = number_rule(1)
POSITIVE_INT_OR_NONE = number_rule(1, optional=True)
FRACTION_OPEN = number_rule(0, 1, lo_open=True, hi_open=True)
RULES: dict[tuple[type, str], Rule] = {
    (ModelConfig, "name"): (_model_name, _model_names),
    **{
        (ModelConfig, k): POSITIVE_INT_OR_NONE
        for k in (
            "img_size",
            "patch_size",
            "embed_dim",
            "depth",
            "num_heads",
            "decoder_dim",
            "decoder_depth",
            "decoder_heads",
            "segments_per_side",
        )
    },
    (DataConfig, "batch_size"): POSITIVE_INT,
    (DataConfig, "num_workers"): number_rule(0),
    (DataConfig, "urls"): (balanced_braces, "shard URLs with balanced braces, e.g. shard-{000000..000127}.tar"),
    (DataConfig, "shuffle_buffer"): number_rule(0),
    (DataConfig, "samples_per_epoch"): POSITIVE_INT_OR_NONE,
    (DataConfig, "num_classes"): POSITIVE_INT_OR_NONE,
    (DataConfig, "read_timeout"): number_rule(0, lo_open=True),
    (DataConfig, "synthetic_size"): POSITIVE_INT,
    (DataConfig, "train_fraction"): FRACTION_OPEN,
    (DataConfig, "min_scale"): number_rule(0, 1, lo_open=True, optional=True),
    (OptimConfig, "blr"): number_rule(0, lo_open=True),
    (OptimConfig, "lr"): number_rule(0, lo_open=True, optional=True),
    (OptimConfig, "min_lr"): number_rule(0),
    (OptimConfig, "weight_decay"): number_rule(0),
    (OptimConfig, "betas"): (two_betas, "two numbers [beta1, beta2], each with 0 <= value < 1"),
    (OptimConfig, "eps"): number_rule(0, lo_open=True),
    (OptimConfig, "clip_grad"): number_rule(0, lo_open=True, optional=True),
    (OptimConfig, "accum_steps"): POSITIVE_INT,
    (OptimConfig, "effective_batch"): POSITIVE_INT_OR_NONE,
    (ScheduleConfig, "epochs"): number_rule(0, lo_open=True),
    (ScheduleConfig, "warmup_epochs"): number_rule(0),
    (ScheduleConfig, "steps_per_epoch"): POSITIVE_INT_OR_NONE,
    (ScheduleConfig, "max_steps"): POSITIVE_INT_OR_NONE,
    (BackendConfig, "fsdp"): POSITIVE_INT,
    (BackendConfig, "compile_cache"): (
        lambda v: not (v and os.path.exists(v) and not os.path.isdir(v)),
        "a directory for XLA's compile cache (this path is a file)",
    ),
    (RunConfig, "log_every"): POSITIVE_INT,
    (RunConfig, "ckpt_every"): number_rule(0),
    (RunConfig, "keep_last"): number_rule(0),
    (RunConfig, "resume"): (lambda v: bool(v.strip()), "auto, never or a checkpoint path"),
    (RunConfig, "out_dir"): (lambda v: bool(v.strip()), "a directory or URL"),
    (ProbeConfig, "k"): POSITIVE_INT,
    (ProbeConfig, "temperature"): number_rule(0, lo_open=True),
    (ProbeConfig, "epochs"): POSITIVE_INT,
    (ProbeConfig, "lr"): number_rule(0, lo_open=True),
    (ProbeConfig, "weight_decay"): number_rule(0),
    (ProbeConfig, "batch_size"): POSITIVE_INT,
    (FinetuneConfig, "num_classes"): POSITIVE_INT,
    (FinetuneConfig, "drop_path"): number_rule(0, 1, hi_open=True),
    (FinetuneConfig, "layer_decay"): number_rule(0, 1, lo_open=True),
    (FinetuneConfig, "mixup"): number_rule(0),
    (FinetuneConfig, "cutmix"): number_rule(0),
    (FinetuneConfig, "smoothing"): number_rule(0, 1, hi_open=True),
    (FinetuneConfig, "reprob"): number_rule(0, 1),
    (FinetuneConfig, "ema_decay"): FRACTION_OPEN,
    (FinetuneConfig, "eval_batch_size"): POSITIVE_INT,
    (FinetuneConfig, "eval_every_epochs"): number_rule(0),
}


def validate(obj: Any, prefix: str = "") -> None:
    """Check every field of a (nested) config dataclass against ``RULES``; the first failure is a ConfigError
    naming the key, the value and what is allowed. A ``Config`` also gets its cross-field checks."""
    check_fields(obj, RULES, prefix)
    if isinstance(obj, Config):
        _check_combinations(obj)


def _check_combinations(cfg: Config) -> None:
    cfg.model.resolve_attention()
    from .models import digpt_config

    try:  # the model's own shape rules (divisibility, taps, segments), checked now rather than at build time
        digpt_config(cfg.model.name, **cfg.model.shape_overrides())
    except ValueError as e:
        raise ConfigError(f"model ({cfg.model.name} with the model.* overrides): {e}") from None
    dims = ParallelDims(cfg.backend.name, cfg.backend.fsdp)
    problem = dims.problem() or dims.placement_problem(cfg.teacher.placement)
    problem = problem or attention_problem(cfg.backend.name, cfg.model.attention)
    if problem:
        raise ConfigError(problem)
    problem = blocks_problem(cfg.backend.name, cfg.backend.scan)
    if problem:
        raise ConfigError(problem)
    for key, seed in (("run.seed", cfg.run.seed), ("run.data_seed", cfg.run.data_seed)):
        if seed is not None and not 0 <= seed < 2**63:  # what every backend's generator accepts (XLA: no negatives)
            raise ConfigError(f"{key}={seed}: a seed from 0 to 2**63 - 1")

    problem = tf32_problem(cfg.backend.name) if cfg.backend.tf32 else None
    if problem:
        raise ConfigError(problem)
    problem = precision_problem(cfg.backend.name, cfg.backend.precision)
    if problem:
        raise ConfigError(
            f"backend.precision={cfg.backend.precision!r} with backend.name={cfg.backend.name!r}: {problem}"
        )
    teacher = teacher_precision(cfg.teacher.precision, cfg.backend.precision)
    problem = precision_problem(cfg.backend.name, teacher, role="teacher")
    if problem:
        raise ConfigError(
            f"teacher.precision={cfg.teacher.precision!r} with backend.name={cfg.backend.name!r}: {problem}"
        )
