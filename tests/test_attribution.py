"""Gap attribution: a no-op factor is identical, the one-ulp control is not, a large deliberate factor is a
systematic shift with the right sign, and bad factor strings are one line."""

import json
import os
import shutil
import signal

import pytest

from conftest import REPO
from parity.__main__ import main as parity_main
from parity.attribution import load_attribution_config
from parity.sides import Factor, parse_factor

STUDY = [
    "--config",
    "yaml/parity/attribution_tiny.yaml",
    "baseline=cpu:fp32",
    "seeds=[0,1]",
    "steps=10",
    "window=5",
    "record_every=5",
    "probe=false",
    # No warmup and a larger lr: ten steps then move the tiny model far enough for a factor to show.
    "overrides=[model.depth=2,data.batch_size=16,schedule.warmup_epochs=0]",
]

REPO_CONFIGS = REPO / "yaml/parity"


def _refuse(constant: str):
    raise AssertionError(f"{constant} in report.json: not JSON")


def test_a_two_seed_study_tells_identical_from_chaos_from_a_real_shift(tmp_path, capsys):
    out = tmp_path / "report"
    # The first is the default and the second changes only what is logged: both train identical weights.
    factors = "factors=[model.attention=sdpa,run.log_every=3,optim.eps=1.0]"
    argv = ["attribute", *STUDY, factors, f"out_dir={out}", f"run_dir={tmp_path / 'runs'}"]
    assert parity_main(argv) == 0
    report = json.loads((out / "report.json").read_text(), parse_constant=_refuse)  # strict JSON: no NaN
    entries = {e["factor"]: e for e in report["factors"]}
    noops = ("model.attention=sdpa", "run.log_every=3")
    assert report["seeds"] == [0, 1] and set(entries) == {*noops, "optim.eps=1.0", *CONTROLS}
    for name in noops:  # every metric from the same steps, whatever the logging: exactly no shift
        noop = entries[name]
        assert noop["verdict"] == "identical" and noop["divergence_at_end"] == 0.0, noop
        assert noop["shifts"]["final_loss"]["mean"] == 0.0 and noop["step1_loss_rel_error"] == 0.0, noop
    ulp = entries["one-ulp"]
    assert not ulp["identical"] and ulp["divergence_at_end"] > 0 and ulp["verdict"].startswith("control")
    # An eps of 1 all but stops Adam: the loss stays higher than the baseline's on every seed.
    eps = entries["optim.eps=1.0"]
    assert eps["verdict"].startswith("systematic: final_loss +"), eps
    assert eps["shifts"]["final_loss"]["mean"] > 0 and eps["divergence_vs_one_ulp"] > 10
    md = (out / "report.md").read_text()
    assert "| `optim.eps=1.0` |" in md and "seeds" in md and (out / "divergence.png").stat().st_size > 1000
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in ledger} == {"final_loss"} and len(ledger) == 2 * (3 + 1 + len(CONTROLS))

    # Rerun: everything is in results.jsonl, nothing runs again.
    results = out / "results.jsonl"
    assert parity_main(argv) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 2 * (3 + 1 + len(CONTROLS))
    assert all(r["plan"]["backend"] == "cpu" and r["plan"]["end_step"] == 10 for r in rows)
    assert {r["plan"]["blocks"] for r in rows} == {"in order"}, "every side's run plan is recorded beside its result"

    # A strong factor added to the study (only its runs run) does not move the study's "seeds needed": those come
    # from the controls; each factor's own figure is beside it.
    def seeds_lines() -> list[str]:
        return [line for line in (out / "report.md").read_text().splitlines() if line.startswith("- ")]

    before = seeds_lines()
    strong = "factors=[model.attention=sdpa,run.log_every=3,optim.eps=1.0,optim.eps=1e-2]"
    assert parity_main(["attribute", *STUDY, strong, f"out_dir={out}", f"run_dir={tmp_path / 'runs'}"]) == 0
    assert seeds_lines() == before and before, before
    added = json.loads((out / "report.json").read_text())
    assert "final_loss" in next(e for e in added["factors"] if e["factor"] == "optim.eps=1e-2")["paired_seeds_needed"]
    results.write_text("".join(r + "\n" for r in results.read_text().splitlines() if '"optim.eps=1e-2"' not in r))
    # Interrupted before the last run, with the scratch run directory gone: the baseline of that seed runs again
    # for its parameters (its row is kept, not repeated), then the missing run.
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n")
    shutil.rmtree(tmp_path / "runs")
    assert parity_main(argv) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == len(lines) and rows[-1]["side"] == json.loads(lines[-1])["side"]
    assert rows[-1]["divergence"] == json.loads(lines[-1])["divergence"]  # the same run, reproduced exactly


CONTROLS = ("one-ulp", "data order", "init")


@pytest.mark.parametrize(
    "factor, message",
    [
        ("tpu:fp32", "'tpu:fp32' is not backend:precision"),
        ("cpu:fp16", "fp16 training needs a loss scaler"),
        ("optim.eps", "'optim.eps' is not backend:precision with backend"),
        ("optim.epsilon=1e-6", "unknown config key 'optim.epsilon'"),
        ("one-ulp", "not named like a control"),
    ],
)
def test_bad_factor_strings_are_one_line_and_exit_2(tmp_path, capsys, factor, message):
    argv = ["attribute", *STUDY, f"factors=[{factor}]", f"out_dir={tmp_path}", f"run_dir={tmp_path}"]
    assert parity_main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize(
    ("override", "message"),
    [("seeds=[0,0,0]", "each seed once"), ("alpha=2", "alpha=2.0: a significance level between 0 and 1")],
    ids=["a repeated seed", "alpha outside (0, 1)"],
)
def test_study_settings_that_would_fake_a_result_are_refused_before_any_run(tmp_path, capsys, override, message):
    argv = ["attribute", *STUDY, "factors=[optim.eps=1.0]", override, f"out_dir={tmp_path}", f"run_dir={tmp_path}"]
    assert parity_main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not list(tmp_path.iterdir())  # refused at load: nothing ran


def test_the_study_is_never_started_without_naming_it(capsys):
    # Without --config the 72-run tiny study used to start by itself.
    with pytest.raises(SystemExit) as exit_:
        parity_main(["attribute"])
    assert exit_.value.code == 2 and "--config" in capsys.readouterr().err


def test_ctrl_c_during_a_study_is_one_line_and_keeps_the_finished_runs(tmp_path, capsys, monkeypatch):
    from digpt_xla.engine import Pretrainer

    calls = {"n": 0}

    def interrupt_in_the_second_run(self):  # after a step of the second run: as if Ctrl-C were pressed then
        calls["n"] += 1
        if calls["n"] == 13:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Pretrainer, "after_step", interrupt_in_the_second_run)
    argv = ["attribute", *STUDY, "factors=[optim.eps=1.0]", f"out_dir={tmp_path / 'out'}", f"run_dir={tmp_path}"]
    assert parity_main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "the study was interrupted in seed 0" in errors[0], errors
    rows = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["side"] == "cpu:fp32"  # the baseline's run, whole


def test_a_factor_is_one_change_on_the_baseline():
    base = parse_factor("cpu:fp32 optim.lr=1e-3")
    assert parse_factor("optim.eps=1e-6", base) == Factor(
        "optim.eps=1e-6", "cpu", "fp32", ("optim.lr=1e-3", "optim.eps=1e-6")
    )
    side = parse_factor("cpu:bf16 teacher=fp16", base)
    assert (side.backend, side.precision, side.overrides[-1]) == ("cpu", "bf16", "teacher.precision=fp16")


@pytest.mark.parametrize("path", sorted(REPO_CONFIGS.glob("attribution_*.yaml")), ids=lambda p: p.stem)
def test_every_committed_attribution_config_loads(path):
    # Every side's pretraining config is built: a renamed key or a refused setting fails here, not on a GPU host.
    cfg = load_attribution_config(str(path))
    assert cfg.factors and len(cfg.seeds) >= 1
