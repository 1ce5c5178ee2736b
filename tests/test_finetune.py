"""Finetuning: a few real steps on digits, exact distributed evaluation, fixed-shape Mixup/CutMix."""

import json
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO, needs_xla, share_of, subprocess_env, torchrun
from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer
from digpt_xla.engine.finetune import Finetuner
from digpt_xla.engine.metrics import read_metrics
from digpt_xla.engine.mixup import FixedShapeMixup


def test_finetuning_from_a_pretraining_checkpoint_lowers_the_loss(tmp_path):
    pre = load_config(
        REPO / "yaml/demo.yaml",
        [
            "backend.name=cpu",
            "schedule.max_steps=2",
            "run.knn_eval=false",
            "run.progress=false",
            f"run.out_dir={tmp_path / 'pre'}",
        ],
    )
    ckpt = Pretrainer(pre).train().checkpoint
    cfg = load_config(
        REPO / "yaml/finetune/tiny_digits.yaml",
        [
            f"finetune.checkpoint={ckpt}",
            "finetune.mixup=0",
            "finetune.cutmix=0",
            "finetune.ema=true",
            "finetune.ema_decay=0.9",
            "schedule.max_steps=40",
            "schedule.warmup_epochs=0.1",
            "run.log_every=1",
            f"run.out_dir={tmp_path / 'ft'}",
        ],
    )
    result = Finetuner(cfg).train()
    records = read_metrics(str(tmp_path / "ft"))
    curve = [r["loss"] for r in records if "loss" in r]
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.15, curve  # from chance level, ln(10) = 2.30
    assert result["eval_samples"] == 359 and result["top1"] > 15.0  # 10 classes: chance is 10%
    assert share_of(result["ema_top1"], 359) and result["ema_top1"] > 15.0  # the EMA of the last ~10 steps' weights
    written = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert written["top1"] == result["top1"] and written["best_top1"] == max(e["top1"] for e in written["evaluations"])
    evals = [r for r in records if "top1" in r]  # 22 steps per epoch at batch 64: epoch 1 at step 22, then the end
    assert [r["step"] for r in evals] == [22, 40] and all(
        {"top5", "ema_top1", "best_top1", "best_epoch"} <= set(r) for r in evals
    )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_distributed_evaluation_counts_every_sample_once(tmp_path):
    common = ["finetune.eval_batch_size=64", f"run.out_dir={tmp_path / 'unused'}"]
    two = [
        *torchrun(2),
        "tests/workers/finetune_eval.py",
        str(tmp_path / "two.json"),
        *common,
    ]
    proc = subprocess.run(
        two, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [PYTHON, "tests/workers/finetune_eval.py", str(tmp_path / "one.json"), *common]
    subprocess.run(one, cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=600)
    a, b = json.loads((tmp_path / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert a["world"] == 2 and b["world"] == 1
    assert a["samples"] == b["samples"] == 359, "180 + 179 samples, the padding of each rank's last batch masked"
    assert a["top1"] == pytest.approx(b["top1"], abs=1e-9) and a["top5"] == pytest.approx(b["top5"], abs=1e-9)


def test_fixed_shape_mixup_and_cutmix():
    mix = FixedShapeMixup(num_classes=4, mixup=0.8, cutmix=1.0, smoothing=0.1, seed=0)
    images = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    kinds = set()
    for _ in range(40):
        mask, lam = mix.draw(16)
        assert mask.shape == (16, 16) and 0 <= lam <= 1
        cut = bool(((mask == 0) | (mask == 1)).all()) and not bool((mask == lam).all())
        kinds.add("cutmix" if cut else "mixup")
        if cut:
            assert lam == pytest.approx(float(mask.mean()))  # the target weight is the kept area
        x, y = mix(images, labels, mask, torch.tensor(lam))
        assert x.shape == images.shape and y.shape == (6, 4)
        torch.testing.assert_close(y.sum(dim=1), torch.ones(6))
        torch.testing.assert_close(x, images * mask + images.flip(0) * (1 - mask))
    assert kinds == {"cutmix", "mixup"}, "both are drawn with the switch probability 0.5"
    plain = FixedShapeMixup(num_classes=4, mixup=0, cutmix=0, smoothing=0.1)
    mask, lam = plain.draw(16)
    assert lam == 1.0 and bool((mask == 1).all())
    assert plain.targets(torch.tensor([2]))[0].tolist() == pytest.approx([0.025, 0.025, 0.925, 0.025])


@pytest.mark.slow
@needs_xla
def test_finetuning_and_evaluation_run_on_xla(tmp_path):
    cfg = load_config(
        REPO / "yaml/finetune/tiny_digits.yaml",
        [
            "backend.name=xla",
            "schedule.max_steps=4",
            "data.batch_size=16",
            "finetune.eval_batch_size=128",
            f"run.out_dir={tmp_path}",
            "run.log_every=2",
        ],
    )
    tuner = Finetuner(cfg)
    result = tuner.train()
    assert result["eval_samples"] == 359 and share_of(result["top1"], 359)
    counters = tuner.backend.debug_counters()
    assert counters["aten_fallbacks"] == {}
    assert len([r for r in read_metrics(str(tmp_path)) if "loss" in r]) == 2
