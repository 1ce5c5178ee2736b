"""Downstream: weight transfer into timm, kNN and linear probes, and the gap ledger."""

import json
import math
import subprocess

import pytest
import timm
import torch

from conftest import PYTHON, REPO, subprocess_env
from digpt_xla.checkpoint.reader import read_state_dict
from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer
from digpt_xla.engine.knn import knn_classify
from digpt_xla.engine.probe import linear_probe
from digpt_xla.models import DiGPT, digpt_config
from digpt_xla.models.classifier import (
    classifier_state,
    create_classifier,
    load_pretrained_encoder,
)
from parity.gap import GapResult, append_result, read_ledger, render_markdown, summarize


def perturbed_tiny() -> DiGPT:
    model = DiGPT(digpt_config("digpt_tiny"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # LayerNorms and the CLS token away from their init
    return model


def test_transferred_encoder_gives_our_features_in_timm():
    model = perturbed_tiny().eval()
    classifier = create_classifier(model.cfg, num_classes=10).eval()
    state, dropped = classifier_state(model.state_dict(), num_classes=10)
    classifier.load_state_dict(state, strict=True)
    assert "mask" in dropped and any(k.startswith("ar_blocks.") for k in dropped)
    assert not any(k.startswith(("blocks.", "patch_embed.")) for k in dropped)
    images = torch.randn(3, 3, 32, 32)
    ours = model.forward_features(images)  # CLS last in the sequence
    tokens = classifier.forward_features(images)  # CLS first; no final norm (fc_norm is applied after pooling)
    torch.testing.assert_close(tokens[:, 1:].mean(dim=1), ours, rtol=1e-5, atol=1e-5)
    # the CLS token itself agrees too: full attention does not care where in the sequence it sits
    with torch.no_grad():
        x = model.patch_embed(images) + model.pos_embed[:, 1:]
        x = torch.cat([x, (model.cls_token + model.pos_embed[:, :1]).expand(3, -1, -1)], dim=1)
        for block in model.blocks:
            x = block(x, torch.zeros(x.shape[1], x.shape[1]))
    torch.testing.assert_close(tokens[:, 0], x[:, -1], rtol=1e-5, atol=1e-5)
    fresh = create_classifier(model.cfg, num_classes=10)
    assert set(load_pretrained_encoder(fresh, model.state_dict())) == set(dropped)


@pytest.mark.multiprocess
def test_convert_checkpoint_loads_strictly_into_timm_vit_base(tmp_path):
    model = DiGPT(digpt_config("digpt_vit_base_patch16_224"))
    torch.save({"model": model.state_dict()}, tmp_path / "release.pth")  # the release wraps weights in "model"
    del model
    out = tmp_path / "vit_b.safetensors"
    cmd = [PYTHON, "tools/convert_checkpoint.py", str(tmp_path / "release.pth"), str(out), "--num-classes", "10"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "dropped: ar_blocks" in proc.stdout and "mask (1)" in proc.stdout
    assert 'timm.create_model("vit_base_patch16_224", global_pool="avg", fc_norm=True, num_classes=10)' in proc.stdout
    from safetensors.torch import load_file

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, global_pool="avg", fc_norm=True, num_classes=10)
    vit.load_state_dict(load_file(out), strict=True)


@pytest.mark.multiprocess
def test_our_training_checkpoint_converts_and_probes(tmp_path):
    cfg = load_config(
        REPO / "yaml/demo.yaml",
        [
            "backend.name=cpu",
            "schedule.max_steps=3",
            "run.knn_eval=false",
            "run.progress=false",
            f"run.out_dir={tmp_path / 'run'}",
        ],
    )
    ckpt = Pretrainer(cfg).train().checkpoint
    state = read_state_dict(ckpt)  # a full training checkpoint, read weights-only like any other file
    assert "cls_token" in state and "ar_pred.weight" in state
    cmd = [
        PYTHON,
        "-m",
        "digpt_xla.cli",
        "probe",
        "--config",
        "yaml/demo.yaml",
        f"probe.checkpoint={ckpt}",
        "probe.epochs=20",
        f"run.out_dir={tmp_path / 'probe'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert result["train_samples"] == 1438 and result["val_samples"] == 359
    assert 30 < result["knn_top1"] <= 100 and 30 < result["linear_top1"] <= 100  # 10 classes: chance is 10%


def separable_features(n_per_class=60, classes=4, dim=16, seed=0):
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 4  # shared by all splits
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([centers[c] + torch.randn(n_per_class, dim, generator=g) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def test_knn_and_linear_probe_separate_separable_features():
    x, y = separable_features()
    xt, yt = separable_features(seed=1)
    assert (knn_classify(x, y, xt, k=10) == yt).float().mean() > 0.97
    assert linear_probe(x, y, xt, yt, epochs=30, lr=0.1) > 97.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    assert linear_probe(x, shuffled, xt, yt, epochs=30, lr=0.1) < 60.0, "labels unrelated to features: no skill"


def test_gap_ledger_flags_a_real_difference_and_ignores_a_null_one(tmp_path):
    ledger = str(tmp_path / "ledger.jsonl")
    base = [70.1, 70.4, 69.8, 70.2, 70.0]
    same = [70.3, 69.9, 70.1, 70.2, 69.8]  # the same distribution
    lower = [68.1, 68.4, 67.9, 68.3, 68.0]  # 2 points below, far outside the noise

    def add(setting, values):
        for seed, v in enumerate(values):
            append_result(ledger, GapResult("cpu", setting, seed, "abc", "rev", "digits", "knn_top1", v))

    add("fp32", base)
    add("bf16", same)
    add("tpu-emulation", lower)
    rows = read_ledger(ledger)
    assert len(rows) == 15
    summary = {s["side"]: s for s in summarize(rows, "knn_top1", "cpu:fp32")}
    assert summary["cpu:tpu-emulation"]["significant"] is True and summary["cpu:tpu-emulation"]["p"] < 1e-4
    assert summary["cpu:bf16"]["significant"] is False
    assert math.isclose(summary["cpu:fp32"]["mean"], sum(base) / 5)
    text = render_markdown(rows, "knn_top1", "cpu:fp32")
    assert "| `cpu:tpu-emulation` | 5 | 68.14 |" in text and "**yes**" in text
    # Seeds matched across settings: a small shift that the seed spread hides from Welch's test but every seed shows.
    spread = [60.0, 70.0, 80.0, 65.0]
    shifted = [v - 0.5 + d for v, d in zip(spread, (0.02, -0.03, 0.01, 0.0), strict=True)]
    paired_rows = []
    for setting, values in (
        ("fp32", spread),
        ("tpu-emulation", shifted),
        ("xla-noise", [v + 0.3 * (-1) ** i for i, v in enumerate(spread)]),
    ):
        paired_rows += [
            {"backend": "cpu", "setting": setting, "seed": i, "metric": "m", "value": v} for i, v in enumerate(values)
        ]
    paired = {s["side"]: s for s in summarize(paired_rows, "m", "cpu:fp32")}
    shift = paired["cpu:tpu-emulation"]
    assert shift["welch_p"] > 0.9 and shift["paired_p"] < 1e-3 and shift["test"] == "paired" and shift["significant"]
    assert paired["cpu:xla-noise"]["significant"] is False, "alternating +-0.3 per seed is noise, not a shift"
    in1k = render_markdown(rows + [dict(rows[0], metric="in1k_finetune_top1")], "in1k_finetune_top1", "cpu:fp32")
    assert "torch + GPU (paper) | 1 | 86.20" in in1k and "torch_xla + TPU (paper) | 1 | 85.90" in in1k


@pytest.mark.multiprocess
def test_gap_cli_add_and_report(tmp_path):
    ledger = tmp_path / "l.jsonl"
    for seed, value in enumerate([1.0, 1.1, 0.9]):
        cmd = [
            PYTHON,
            "-m",
            "parity",
            "gap",
            "add",
            "--ledger",
            str(ledger),
            "--backend",
            "cpu",
            "--setting",
            "fp32",
            "--seed",
            str(seed),
            "--metric",
            "m",
            "--value",
            str(value),
            "--config",
            "yaml/demo.yaml",
        ]
        subprocess.run(cmd, cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=120)
    rows = read_ledger(str(ledger))
    assert len({r["config_hash"] for r in rows}) == 1 and rows[0]["config_hash"] != "unknown"
    report = [
        PYTHON,
        "-m",
        "parity",
        "gap",
        "report",
        "--ledger",
        str(ledger),
        "--metric",
        "m",
        "--baseline",
        "cpu:nope",
    ]
    proc = subprocess.run(report, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "baseline 'cpu:nope' has no m rows" in proc.stderr
    with pytest.raises(Exception, match="missing"):
        (tmp_path / "bad.jsonl").write_text('{"backend": "cpu"}\n')
        read_ledger(str(tmp_path / "bad.jsonl"))
