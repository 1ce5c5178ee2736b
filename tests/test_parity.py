"""The parity harness: self-consistency, localisation of a planted difference, TPU emulation, reports."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, needs_xla
from digpt_xla.tpu_emulation import round_bf16, tpu_matmul_emulation
from parity.__main__ import main as parity_main
from parity.sides import Side, SideError

TINY = str(REPO / "yaml/parity/tiny_fp32.yaml")


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_identical_sides_give_zero_error_and_exit_0(tmp_path):
    rc = parity_main(["run", "--config", TINY, "--out", str(tmp_path), "sides=[cpu:fp32, cpu:fp32]", "steps=3"])
    assert rc == 0
    comp = _report(tmp_path)["comparisons"][0]
    assert comp["passed"] and comp["first_divergent"] is None
    assert comp["losses"]["ar_loss"]["rel"] == 0 and comp["losses"]["kd_loss"]["rel"] == 0
    assert all(a["max_abs"] == 0 for a in comp["activations"])
    assert all(g["max_abs"] == 0 for g in comp["grads"].values())
    assert all(s["abs"] == 0 for s in comp["trajectory"]["steps"])


def test_perturbed_layernorm_is_found_and_exit_1(tmp_path):
    rc = parity_main(
        [
            "run",
            "--config",
            TINY,
            "--out",
            str(tmp_path),
            "sides=[cpu:fp32, cpu:fp32]",
            "steps=2",
            "perturb=blocks.2.norm2.eps=0.01",
        ]
    )
    assert rc == 1
    comp = _report(tmp_path)["comparisons"][0]
    assert comp["first_divergent"]["module"] == "blocks.2.norm2"
    before = comp["activations"][: comp["first_divergent"]["index"]]
    assert before and all(a["max_abs"] == 0 for a in before), "everything before it is identical"
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: FAIL**" in md and "`blocks.2.norm2`" in md


def test_tpu_emulation_single_linear_against_hand_computation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256)
    x = torch.randn(8, 512, requires_grad=True)
    exact = lin(x)
    with tpu_matmul_emulation():
        emulated = lin(x)
    hand = round_bf16(x) @ round_bf16(lin.weight).T + lin.bias  # bf16 operands, fp32 accumulation, fp32 bias
    torch.testing.assert_close(emulated, hand, rtol=0, atol=2e-6)
    rel = ((emulated - exact).norm() / exact.norm()).item()
    assert 3e-4 < rel < 5e-3, rel  # bf16 rounding: about 1e-3 relative
    # backward: the incoming gradient is rounded before the backward matmuls
    g = torch.randn_like(emulated)
    (emulated * g).sum().backward()
    torch.testing.assert_close(x.grad, round_bf16(g) @ round_bf16(lin.weight), rtol=0, atol=2e-6)


def test_tpu_emulation_leaves_non_matmul_ops_exact():
    x = torch.randn(4, 64) * 3
    with tpu_matmul_emulation():
        ln = F.layer_norm(x, (64,))
        sm = x.softmax(-1)
        ge = F.gelu(x)
        add = x + 1.0
    assert torch.equal(ln, F.layer_norm(x, (64,))) and torch.equal(sm, x.softmax(-1))
    assert torch.equal(ge, F.gelu(x)) and torch.equal(add, x + 1.0)


def test_tpu_emulation_attention_and_model_changes_by_bf16_order():
    from digpt_xla.models import create_digpt

    q, k, v = torch.randn(3, 2, 2, 10, 16).unbind(0)
    mask = torch.zeros(10, 10)
    with tpu_matmul_emulation():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    p = ((round_bf16(q) @ round_bf16(k).transpose(-1, -2)) * 0.25 + mask).softmax(-1)
    torch.testing.assert_close(out, round_bf16(p) @ round_bf16(v), rtol=0, atol=1e-6)
    model = create_digpt("digpt_tiny")
    args = (torch.randn(2, 3, 32, 32), torch.randn(2, 65, 48), torch.tensor([[0, 1, 2, 3], [2, 0, 3, 1]]))
    exact = model(*args)
    with tpu_matmul_emulation():
        emulated = model(*args)
    rel = abs(exact.ar_loss.item() - emulated.ar_loss.item()) / exact.ar_loss.item()
    assert 0 < rel < 1e-2


def test_side_validation():
    assert Side.parse("xla:xla-highest") == Side("xla", "xla-highest")
    assert str(Side.parse("cpu")) == "cpu:fp32"
    for bad in ("tpu:fp32", "cpu:fp8", "xla:tpu-emulation", "cpu:fp16", "cpu:xla-high"):
        with pytest.raises(SideError):
            Side.parse(bad)
    assert parity_main(["run", "--config", TINY, "--backends", "cpu"]) == 2


@pytest.mark.slow
@needs_xla
def test_tiny_cpu_vs_xla_config_passes_and_reports(tmp_path):
    rc = parity_main(["run", "--config", TINY, "--out", str(tmp_path)])
    report = _report(tmp_path)
    comp = report["comparisons"][0]
    assert rc == 0, [c for c in comp["checks"] if not c["ok"]]
    assert [s["side"] for s in report["sides"]] == ["cpu:fp32", "xla:fp32"]
    assert comp["losses"]["ar_loss"]["rel"] <= 1e-6 and len(comp["trajectory"]["steps"]) == 10
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: PASS**" in md
    for check in comp["checks"]:  # every figure of the verdict table is in the JSON and shown in the Markdown
        assert check["check"] in md
    assert f"{comp['losses']['ar_loss']['ref']:.8f}" in md
    assert (tmp_path / "layer_error.png").stat().st_size > 1000 and (tmp_path / "loss_drift.png").exists()


@pytest.mark.parametrize(
    ("perturb", "named"),
    [("optim.eps=1e-3", "eps"), ("schedule.warmup_epochs=0.5", "lr")],
    ids=["adamw-eps", "lr-schedule"],
)
def test_an_optimizer_perturbation_is_caught_by_the_one_step_update_and_named(tmp_path, perturb, named):
    rc = parity_main(
        ["run", "--config", TINY, "--out", str(tmp_path), "sides=[cpu:fp32, cpu:fp32]", "steps=2", f"perturb={perturb}"]
    )
    assert rc == 1
    comp = _report(tmp_path)["comparisons"][0]
    failed = {c["check"] for c in comp["checks"] if c["ok"] is False}
    assert "parameters after one step, rel. L2 error" in failed
    assert comp["losses"]["ar_loss"]["rel"] == 0 and all(g["max_abs"] == 0 for g in comp["grads"].values()), (
        "forward and gradients are untouched: only the update differs"
    )
    assert [d["setting"] for d in comp["optimizer_differences"]] == [named]
    assert f"Optimizer settings differ from the reference: {named}" in (tmp_path / "report.md").read_text()


def test_the_report_states_each_sides_optimizer_step(tmp_path):
    assert (
        parity_main(
            [
                "run",
                "--config",
                TINY,
                "--out",
                str(tmp_path),
                "sides=[cpu:fp32, cpu:fp32]",
                "steps=3",
                "optim.clip_grad=1.0",
            ]
        )
        == 0
    )
    report = _report(tmp_path)
    for side in report["sides"]:
        opt = side["optimizer"]
        assert opt["optimizer"] == "AdamW" and opt["clip_grad"] == 1.0 and opt["grad_scaler"] is False
        assert opt["weight_decay"] == [0.0, 0.05], "the pretrainer's groups: no decay on biases and norms"
        assert side["lrs"][0] == pytest.approx(1e-4) and side["lrs"][0] > side["lrs"][1] > side["lrs"][2] > 0
    assert "| fused | capturable | foreach |" in (tmp_path / "report.md").read_text()


def test_clip_teacher_precision_is_a_side_factor(tmp_path):
    rc = parity_main(["run", "--config", str(REPO / "yaml/parity/tiny_clip_teacher.yaml"), "--out", str(tmp_path)])
    assert rc == 0
    report = _report(tmp_path)
    same, bf16 = report["comparisons"]
    assert same["candidate"] == "cpu:fp32 teacher=fp32" and bf16["candidate"] == "cpu:fp32 teacher=bf16"
    assert same["teacher_tokens"]["max_abs"] == 0 and same["losses"]["ar_loss"]["rel"] == 0
    assert 1e-4 < bf16["teacher_tokens"]["rel_l2"] < 0.1, bf16["teacher_tokens"]
    assert bf16["teacher_tokens"]["min_token_cosine"] < 1.0
    assert bf16["losses"]["ar_loss"]["rel"] > 0, "the student sees the bf16 teacher's targets"
    md = (tmp_path / "report.md").read_text()
    assert "teacher tokens (first batch)" in md and "teacher clip ViT-B-16" in md


def test_side_teacher_modifier_validation():
    assert Side.parse("cpu:fp32 teacher=fp16") == Side("cpu", "fp32", "fp16")
    assert str(Side.parse("cpu:bf16 teacher=fp32")) == "cpu:bf16 teacher=fp32"
    assert Side.parse("cpu:bf16").teacher_precision == "bf16"
    for bad in ("xla:fp32 teacher=fp16", "cpu:fp32 student=bf16", "cpu:fp32 teacher=fp8"):
        with pytest.raises(SideError):
            Side.parse(bad)
