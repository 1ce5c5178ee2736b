"""The cuda backend: fp32 against eager CPU, bf16 and fp16 (GradScaler) training, and torch.compile of the step.

Skipped where no GPU is present (CI); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

import pytest
import torch

from conftest import REPO, share_of
from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer
from digpt_xla.engine.metrics import read_metrics

TINY = ["data.batch_size=16", "run.log_every=1", "run.knn_eval=false", "run.progress=false", "run.resume=never"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
pytestmark = pytest.mark.cuda


def run(tmp_path, name, *overrides) -> dict[int, float]:
    out = tmp_path / name
    cfg = load_config(REPO / "yaml/demo.yaml", [*TINY, f"run.out_dir={out}", *overrides])
    Pretrainer(cfg).train()
    return {r["step"]: r["loss"] for r in read_metrics(str(out))}


def relative(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


@needs_cuda
def test_cuda_fp32_matches_eager_cpu(tmp_path):
    # TF32 is off in the cuda backend, so only kernel summation order separates the two
    cuda = run(tmp_path, "cuda", "backend.name=cuda", "schedule.max_steps=5")
    cpu = run(tmp_path, "cpu", "backend.name=cpu", "schedule.max_steps=5")
    assert relative(cuda, cpu) < 1e-5, (cuda, cpu)


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains(tmp_path, precision):
    curve = run(tmp_path, precision, "backend.name=cuda", f"backend.precision={precision}", "schedule.max_steps=30")
    assert all(torch.isfinite(torch.tensor(v)) for v in curve.values())
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
    assert last < first - 0.1, (first, last)
    # the same steps in fp32 land close: mixed precision changes rounding, not the optimisation
    fp32 = run(tmp_path, f"{precision}-ref", "backend.name=cuda", "schedule.max_steps=30")
    assert abs(curve[30] - fp32[30]) / fp32[30] < 0.05, (curve[30], fp32[30])


@needs_cuda
def test_torch_compile_matches_eager_on_cuda(tmp_path):
    compiled = run(tmp_path, "compiled", "backend.name=cuda", "backend.compile=true", "schedule.max_steps=5")
    eager = run(tmp_path, "eager", "backend.name=cuda", "schedule.max_steps=5")
    assert relative(compiled, eager) < 1e-4, (compiled, eager)


@needs_cuda
def test_compiled_checkpoint_keeps_release_key_names(tmp_path):
    cfg = load_config(
        REPO / "yaml/demo.yaml",
        [*TINY, f"run.out_dir={tmp_path}", "backend.name=cuda", "backend.compile=true", "schedule.max_steps=1"],
    )
    trainer = Pretrainer(cfg)
    keys = set(trainer.state.single_file_state()["model"])
    assert keys and not any("_orig_mod" in k for k in keys)


@needs_cuda
def test_fp16_finetuning_uses_a_loss_scaler(tmp_path):
    from digpt_xla.engine.finetune import Finetuner

    cfg = load_config(
        REPO / "yaml/finetune/tiny_digits.yaml",
        [
            "backend.name=cuda",
            "backend.precision=fp16",
            "schedule.max_steps=30",
            "run.log_every=1",
            "run.progress=false",
            "data.batch_size=16",
            f"run.out_dir={tmp_path}",
        ],
    )
    tuner = Finetuner(cfg)
    scaler = tuner.opt_step.scaler
    assert scaler is not None
    scaler._init_scale = 2.0**24  # fp16 gradients overflow at this scale: the scaler must back off
    scales = []
    original = scaler.update

    def record(*args, **kwargs):
        original(*args, **kwargs)
        scales.append(scaler.get_scale())

    scaler.update = record
    result = tuner.train()
    assert len(scales) == 30 and len(set(scales)) > 1, "the dynamic scale moved over the steps"
    assert share_of(result["top1"], result["eval_samples"])
