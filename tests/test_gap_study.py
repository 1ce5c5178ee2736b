"""The gap study's command at test scale (one seed, a few steps) and the tpu-emulation training precision."""

import json

import pytest
import torch

from conftest import needs_xla, share_of
from digpt_xla.backend import BackendError, create_backend
from digpt_xla.config import ConfigError
from parity.gap import read_ledger
from parity.gap_study import GapStudy, load_study_config

SHORT = ["seeds=[0]", "pretrain_overrides=[schedule.max_steps=3]", "finetune_overrides=[schedule.max_steps=3]"]


def test_study_fills_the_ledger_reports_and_skips_what_is_done(tmp_path):
    out, runs = tmp_path / "report", tmp_path / "runs"
    overrides = [*SHORT, "sides=[cpu:fp32,cpu:tpu-emulation]", f"out_dir={out}", f"run_dir={runs}"]
    cfg = load_study_config("yaml/parity/gap_study_digits.yaml", overrides)
    assert GapStudy(cfg).run()["ran"] == 2

    rows = read_ledger(str(out / "ledger.jsonl"))
    got = {(r["backend"], r["setting"], r["metric"]): r["value"] for r in rows}
    metrics = ("finetune_top1", "linear_top1", "knn_top1", "pretrain_loss")
    assert set(got) == {("cpu", s, m) for s in ("fp32", "tpu-emulation") for m in metrics}
    assert len({r["config_hash"] for r in rows}) == 1 and all(r["seed"] == 0 for r in rows)
    for m in ("finetune_top1", "linear_top1", "knn_top1"):  # accuracies over the 359 held-out digits
        assert share_of(got[("cpu", "fp32", m)], 359), (m, got[("cpu", "fp32", m)])
    assert got[("cpu", "fp32", "knn_top1")] > 30.0  # 10 classes: chance is 10%; digits are near apart even so
    # The emulation is active in training: bf16-rounded matmul operands move the loss, by far less than 1%.
    fp32, emulated = got[("cpu", "fp32", "pretrain_loss")], got[("cpu", "tpu-emulation", "pretrain_loss")]
    assert fp32 != emulated and abs(fp32 - emulated) / fp32 < 1e-2
    # Finetuning ran on each side from its own pretraining checkpoint.
    for side in ("cpu_fp32", "cpu_tpu-emulation"):
        tuned = json.loads((runs / side / "seed0" / "finetune" / "finetune.json").read_text())
        assert tuned["step"] == 3 and tuned["top1"] == got[("cpu", side.split("_", 1)[1], "finetune_top1")]

    report = (out / "report.md").read_text()
    for heading in ("## finetune top-1 (%)", "## linear probe top-1 (%)", "## kNN top-1 (%)", "## final pretraining"):
        assert heading in report
    assert "| `cpu:tpu-emulation` | 1 |" in report and "85.9" in report
    fp32_finetune = f"{got[('cpu', 'fp32', 'finetune_top1')]:.2f}"
    assert f"| seed | `cpu:fp32` | `cpu:tpu-emulation` |\n|---|---|---|\n| 0 | {fp32_finetune} |" in report
    assert (out / "gap_study.png").stat().st_size > 10_000
    assert set(json.loads((out / "study.json").read_text())["summary"]) == set(metrics)

    again = GapStudy(load_study_config("yaml/parity/gap_study_digits.yaml", overrides)).run()
    assert again["ran"] == 0 and len(read_ledger(str(out / "ledger.jsonl"))) == len(rows)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sides=[cpu:fp32,tpu:bf16]", "study side 'tpu:bf16'"),
        ("sides=[cpu:fp32,xla:xla-high]", "study side 'xla:xla-high'"),
        ("baseline=xla:fp32", "baseline 'xla:fp32' is not one of the sides"),
        ("metrics=[top1]", "metrics ['top1'] unknown"),
    ],
)
def test_study_config_errors_name_the_value(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_study_config("yaml/parity/gap_study_digits.yaml", ["sides=[cpu:fp32]", override])


def test_precisions_are_checked_per_backend():
    cpu = create_backend("cpu")
    with pytest.raises(BackendError, match="fp16 training needs a loss scaler"):
        cpu.check_precision("fp16")
    with cpu.autocast("tpu-emulation"):
        a = torch.tensor([[1.0 + 2**-12]])
        assert (a @ torch.ones(1, 1)).item() == 1.0, "the operand was not rounded to bf16"


@needs_xla
def test_xla_rejects_tpu_emulation():
    with pytest.raises(
        BackendError,
        match="tpu-emulation runs on the cpu backend; as the training precision on xla use one of fp32, bf16",
    ):
        create_backend("xla").check_precision("tpu-emulation")
