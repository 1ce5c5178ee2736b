"""What a user (or an attacker) hands us: crafted pickles at every entry point, bad config values, object-store
run directories. Each mistake is one line naming the key or file and exit 2, quickly; nothing runs code from a
checkpoint; every output lands under the run directory's URL."""

import json
import os
import signal
import subprocess
import time

import fsspec
import pytest
import torch

from conftest import FAST_CPU, PYTHON, REPO, subprocess_env
from digpt_xla.cli import main as digpt_main
from digpt_xla.cli import plot_losses
from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer
from digpt_xla.engine.finetune import Finetuner
from digpt_xla.engine.probe_run import run_probe
from parity.__main__ import main as parity_main

CPU = FAST_CPU


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(tmp_path, kind: str):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if kind == "torch zip":
        torch.save({"model": {"w": torch.zeros(1)}, "step": _RunsCode(marker)}, path)
    else:
        import pickle

        path.write_bytes(pickle.dumps({"model": _RunsCode(marker)}))
    return path, marker


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


ENTRY_POINTS = {
    "run.resume": lambda p, out: digpt_main(
        ["pretrain", "--config", "yaml/demo.yaml", *CPU, f"run.resume={p}", f"run.out_dir={out}"]
    ),
    "finetune.checkpoint": lambda p, out: digpt_main(["finetune", f"finetune.checkpoint={p}", f"run.out_dir={out}"]),
    "probe.checkpoint": lambda p, out: digpt_main(["probe", f"probe.checkpoint={p}", f"run.out_dir={out}"]),
    "teacher.checkpoint": lambda p, out: digpt_main(
        [
            "pretrain",
            "--config",
            "yaml/demo.yaml",
            *CPU,
            "teacher.kind=clip",
            "teacher.clip_model=ViT-B-16",
            f"teacher.checkpoint={p}",
            f"run.out_dir={out}",
        ]
    ),
    "convert_checkpoint.py": lambda p, out: _convert([str(p), f"{out}/timm.safetensors", "--num-classes", "10"]),
}


def _convert(argv):
    from digpt_xla.convert import main

    return main(argv)


@pytest.mark.parametrize("kind", ["torch zip", "plain pickle"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_crafted_pickle_runs_nothing_at_any_entry_point(tmp_path, capsys, entry, kind):
    path, marker = _crafted(tmp_path, kind)
    out = tmp_path / "out"
    assert ENTRY_POINTS[entry](path, out) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "refused" in line and "weights_only" in line, line
    assert not marker.exists(), "code from the checkpoint ran"
    assert not (out / "timm.safetensors").exists() and not (out / "checkpoints").exists()


@pytest.mark.multiprocess
def test_sigterm_during_setup_stops_promptly(tmp_path):
    # Building the ViT-H/14 teacher takes several seconds: the signal arrives while it is being built.
    cmd = [
        PYTHON,
        "-m",
        "digpt_xla.cli",
        "pretrain",
        "--config",
        "yaml/demo.yaml",
        *CPU,
        "teacher.kind=clip",
        "teacher.clip_model=ViT-H-14",
        f"run.out_dir={tmp_path}",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert time.perf_counter() - t0 < 10 and proc.returncode != 0


@pytest.mark.multiprocess
def test_sigterm_during_the_first_step_stops_at_once(tmp_path):
    # A CLIP ViT-H/14 teacher makes the first step half a minute on the CPU (on XLA the first step compiles for
    # minutes): a stop notice then has nothing new to save, and waiting for the step would only delay the stop.
    cmd = [PYTHON, "-m", "digpt_xla.cli", "pretrain", "--config", "yaml/demo.yaml", *CPU, "teacher.kind=clip"]
    cmd += [f"run.out_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # the trainer says what it runs once set-up is done; the first step follows
        if "run plan: " in line:
            break
    time.sleep(1.0)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.perf_counter() - t0 < 10 and proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "before the run's first step finished" in err and not (tmp_path / "checkpoints").exists()


def _object_store(kind, tmp_path) -> str:
    return "memory://hostile/run" if kind == "memory" else f"file://{tmp_path}/store/run"


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_every_output_lands_under_an_fsspec_run_directory(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)  # a literal "memory:" or "file:" directory would appear here
    root = _object_store(kind, tmp_path)
    fs, base = fsspec.core.url_to_fs(root)
    if fs.exists(base):
        fs.rm(base, recursive=True)
    pre = f"{root}/pretrain"
    cfg = load_config(
        REPO / "yaml/demo.yaml",
        [*CPU, "run.log_every=1", "run.ckpt_every=2", "schedule.max_steps=4", f"run.out_dir={pre}"],
    )
    Pretrainer(cfg).train()
    cfg.schedule.max_steps, cfg.run.resume = 6, "auto"
    resumed = Pretrainer(cfg)
    assert resumed.step == 4
    resumed.train()
    plot_losses(pre, "tiny")
    ft = load_config(
        REPO / "yaml/finetune/tiny_digits.yaml",
        [
            "backend.name=cpu",
            "run.progress=false",
            "data.batch_size=16",
            "schedule.max_steps=3",
            "run.log_every=1",
            "model.depth=2",
            f"finetune.checkpoint={pre}/checkpoints/ckpt-00000006.pt",
            f"run.out_dir={root}/finetune",
        ],
    )
    Finetuner(ft).train()
    probe = load_config(
        REPO / "yaml/demo.yaml",
        [
            "backend.name=cpu",
            "probe.epochs=2",
            "model.depth=2",
            f"run.out_dir={root}/probe",
            f"probe.checkpoint={pre}/checkpoints/ckpt-00000006.pt",
        ],
    )
    run_probe(probe)
    assert (
        parity_main(
            [
                "run",
                "--config",
                "yaml/parity/tiny_fp32.yaml",
                "--out",
                f"{root}/parity",
                "steps=2",
                "sides=[cpu:fp32, cpu:fp32]",
            ]
        )
        == 0
    )
    for backend in ("cpu", "xla"):
        assert (
            parity_main(
                [
                    "gap",
                    "add",
                    "--ledger",
                    f"{root}/gap/ledger.jsonl",
                    "--backend",
                    backend,
                    "--setting",
                    "fp32",
                    "--seed",
                    "0",
                    "--metric",
                    "knn_top1",
                    "--value",
                    "60",
                ]
            )
            == 0
        )
    assert (
        parity_main(
            [
                "gap",
                "report",
                "--ledger",
                f"{root}/gap/ledger.jsonl",
                "--metric",
                "knn_top1",
                "--baseline",
                "cpu:fp32",
                "--out",
                f"{root}/gap/report.md",
            ]
        )
        == 0
    )

    files = {p.removeprefix(base.rstrip("/") + "/") for p in fs.find(base)}
    expected = {
        "pretrain/metrics.jsonl",
        "pretrain/loss_curve.png",
        "pretrain/checkpoints/ckpt-00000006.done",
        "finetune/finetune.json",
        "finetune/metrics.jsonl",
        "finetune/checkpoints/ckpt-00000003.pt",
        "probe/probe.json",
        "parity/report.json",
        "parity/report.md",
        "parity/layer_error.png",
        "gap/ledger.jsonl",
        "gap/report.md",
    }
    assert expected <= files, expected - files
    assert any(f.startswith("pretrain/tb/events.out.tfevents") for f in files)
    assert any(f.startswith("finetune/tb/events.out.tfevents") for f in files)
    steps = [json.loads(line)["step"] for line in fs.cat_file(f"{base}/pretrain/metrics.jsonl").decode().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], "the resumed run continued the log it pulled from the store"
    assert json.loads(fs.cat_file(f"{base}/finetune/finetune.json"))["step"] == 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(":")], os.listdir(tmp_path)


def test_a_checkpoint_with_a_non_finite_parameter_is_never_committed(tmp_path):
    from digpt_xla.checkpoint.manager import CheckpointManager
    from digpt_xla.checkpoint.reader import CheckpointError

    manager = CheckpointManager(str(tmp_path))
    state = {"model": {"w": torch.tensor([1.0, float("nan")]), "mask": torch.tensor([float("-inf")])}, "step": 3}
    with pytest.raises(CheckpointError, match="refusing to commit .*ckpt-00000003.pt: parameter 'w' is not finite"):
        manager.save(state, 3, parameters=["w"])
    assert manager.complete_steps() == [] and not list(tmp_path.iterdir())
    state["model"]["w"] = torch.ones(2)
    manager.save(state, 3, parameters=["w"])  # a buffer may hold -inf (the attention mask does)
    assert manager.complete_steps() == [3]

    def write(url: str) -> None:
        raise AssertionError("a refused checkpoint writes no shard")

    with pytest.raises(CheckpointError, match="refusing to commit .*ckpt-00000006: parameter 'w' is not finite"):
        manager.save_sharded(
            6, {"step": 6}, write, is_main=True, expected={}, nonfinite=["w"]
        )  # names found on the devices
    assert manager.complete_steps() == [3] and not (tmp_path / "ckpt-00000006").exists()
