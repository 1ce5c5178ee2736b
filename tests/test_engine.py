"""Real training runs of digpt_tiny on the embedded digits: CPU, XLA:CPU, torchrun, SPMD, resume and faults."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, needs_xla, subprocess_env, torchrun
from digpt_xla.backend import BackendError, create_backend
from digpt_xla.checkpoint.manager import CheckpointManager
from digpt_xla.checkpoint.reader import read_checkpoint
from digpt_xla.config import load_config
from digpt_xla.engine import NonFiniteLossError, Pretrainer
from digpt_xla.engine.metrics import read_metrics
from digpt_xla.models import DiGPTOutput

TINY = ["data.batch_size=16", "run.log_every=1", "run.knn_eval=false", "run.progress=false", "run.resume=never"]
SMALLER = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2"]  # for subprocess-heavy tests


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir))}


def run_cpu(tmp_path, name, *overrides):
    cfg = load_config(
        REPO / "yaml/demo.yaml", [*TINY, "backend.name=cpu", f"run.out_dir={tmp_path / name}", *overrides]
    )
    return Pretrainer(cfg).train(), tmp_path / name


def test_cpu_loss_decreases(tmp_path):
    result, run_dir = run_cpu(tmp_path, "cpu", "schedule.max_steps=30")
    assert result.step == 30 and result.stopped == "max_steps"
    curve = losses(run_dir)
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
    assert last < first - 0.1, (first, last)
    ckpt = read_checkpoint(result.checkpoint)
    assert ckpt["step"] == 30 and ckpt["data"]["consumed_batches"] == 30
    assert set(ckpt) >= {"model", "optimizer", "rng", "config", "git_revision", "scaler"}


@pytest.fixture(scope="module")
def xla_spawn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("xla") / "run"
    cmd = [
        PYTHON,
        "tools/xla_spawn.py",
        "--config",
        "yaml/demo.yaml",
        *TINY,
        f"run.out_dir={out}",
        "schedule.max_steps=30",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    return proc, out


@pytest.mark.slow
@pytest.mark.multiprocess
@needs_xla
def test_xla_spawn_runs_and_loss_decreases(xla_spawn_run):
    proc, out = xla_spawn_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run plan: pretrain on xla (1 device, 1 process: data 1 x fsdp 1)" in proc.stderr
    curve = losses(out)
    assert max(curve) == 30
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
    assert last < first - 0.1, (first, last)
    assert (out / "checkpoints" / "ckpt-00000030.done").exists()


@needs_xla
def test_eager_and_xla_first_losses_agree(xla_spawn_run, tmp_path):
    proc, out = xla_spawn_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, eager_dir = run_cpu(tmp_path, "eager", "schedule.max_steps=3")
    xla, eager = losses(out), losses(eager_dir)
    for step in (1, 2, 3):
        assert abs(xla[step] - eager[step]) <= 1e-5 * abs(eager[step]), (step, xla[step], eager[step])


def _pretrain_cmd(out, *overrides):
    return [
        PYTHON,
        "-m",
        "digpt_xla.cli",
        "pretrain",
        "--config",
        "yaml/demo.yaml",
        *TINY,
        *SMALLER,
        "backend.name=cpu",
        f"run.out_dir={out}",
        *overrides,
    ]


def _start_and_interrupt(out, sig, after_step, *overrides):
    proc = subprocess.Popen(
        _pretrain_cmd(out, *overrides),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = Path(out) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_step:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, sig):
    out = tmp_path / "interrupted"
    rc, err = _start_and_interrupt(out, sig, 5, "schedule.max_steps=1000", "run.ckpt_every=3")
    if sig == signal.SIGTERM:
        assert rc == 0, err[-2000:]
        assert "will checkpoint and stop" in err
    else:
        assert rc == -signal.SIGKILL
    stopped_at = CheckpointManager(str(out / "checkpoints")).complete_steps()[-1]
    assert stopped_at >= 3
    end = stopped_at + 4
    subprocess.run(
        _pretrain_cmd(out, f"schedule.max_steps={end}", "run.ckpt_every=3", "run.resume=auto"),
        cwd=REPO,
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    ref = tmp_path / "reference"
    subprocess.run(
        _pretrain_cmd(ref, f"schedule.max_steps={end}", "run.ckpt_every=3"),
        cwd=REPO,
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    resumed, reference = losses(out), losses(ref)
    assert sorted(resumed) == list(range(1, end + 1)), "one record per step, nothing lost or repeated"
    assert [resumed[s] for s in range(1, end + 1)] == [reference[s] for s in range(1, end + 1)]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    overrides = ["backend.name=cpu", f"run.out_dir={tmp_path}", "schedule.max_steps=20", "run.ckpt_every=2"]
    cfg = load_config(REPO / "yaml/demo.yaml", [*TINY, *SMALLER, *overrides, "run.log_every=5"])
    trainer = Pretrainer(cfg)
    calls = {"n": 0}

    def inject_nan(module, args, output):
        calls["n"] += 1
        return DiGPTOutput(output.ar_loss * float("nan"), output.kd_loss) if calls["n"] >= 7 else output

    trainer.model.register_forward_hook(inject_nan)
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        trainer.train()
    manager = CheckpointManager(str(tmp_path / "checkpoints"))
    assert manager.complete_steps()[-1] == 6, "the checkpoint due at step 8 is not written after the NaN of step 7"
    state = read_checkpoint(manager.latest())
    assert all(torch.isfinite(v).all() for k, v in state["model"].items() if k != "mask"), "weights are finite"


@pytest.mark.multiprocess
def test_torchrun_two_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    common = [*SMALLER, "backend.name=cpu", f"run.out_dir={tmp_path / 'unused'}"]
    cmd = [
        *torchrun(2),
        "tests/workers/step_grads.py",
        str(tmp_path / "ddp.pt"),
        "data.batch_size=4",
        *common,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = [PYTHON, "tests/workers/step_grads.py", str(tmp_path / "one.pt"), "data.batch_size=8", *common]
    subprocess.run(single, cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=600)
    ddp, one = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")
    torch.testing.assert_close(ddp["loss"], one["loss"], rtol=1e-5, atol=0)
    assert ddp["grads"].keys() == one["grads"].keys()
    for name, g in one["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.multiprocess
def test_a_run_directory_that_not_every_rank_sees_is_refused_at_start(tmp_path):
    # memory:// is one store per process, as node-local disks are one per node: rank 1 would write its part of
    # every checkpoint where nobody reads it.
    cmd = [*torchrun(2), "-m", "digpt_xla.cli", "pretrain", *_pretrain_cmd("memory://not-shared/run")[4:]]
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0
    assert "rank 1 does not see the lease.json that the main rank holds" in proc.stderr, proc.stderr[-3000:]
    # Both ranks stop at the check, each with one line: none is left in a collective to die with a traceback.
    assert "another rank does not see the lease.json this rank holds" in proc.stderr, proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


@pytest.mark.multiprocess
@needs_xla
def test_xla_spmd_four_devices_match_one_device(tmp_path):
    common = [*SMALLER, f"run.out_dir={tmp_path / 'unused'}"]
    spmd = [
        PYTHON,
        "tests/workers/step_grads.py",
        str(tmp_path / "spmd.pt"),
        "backend.name=xla-spmd",
        "data.batch_size=2",
        *common,
    ]
    proc = subprocess.run(
        spmd, cwd=REPO, env=subprocess_env(CPU_NUM_DEVICES="4"), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "xla-spmd" in proc.stderr
    # Four virtual devices take four per-device batches: said once, since on a real slice it is the point.
    assert proc.stderr.count("the global batch and the learning rate scale with the device count") == 1
    eager = [
        PYTHON,
        "tests/workers/step_grads.py",
        str(tmp_path / "cpu.pt"),
        "backend.name=cpu",
        "data.batch_size=8",
        *common,
    ]
    subprocess.run(eager, cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=600)
    a, b = torch.load(tmp_path / "spmd.pt"), torch.load(tmp_path / "cpu.pt")
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=0)
    for name, g in b["grads"].items():
        torch.testing.assert_close(a["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_effective_batch_sets_accumulation(tmp_path):
    result, run_dir = run_cpu(tmp_path, "accum", "optim.effective_batch=32", "schedule.max_steps=2")
    assert read_checkpoint(result.checkpoint)["data"]["consumed_batches"] == 4
    with pytest.raises(ValueError, match="effective_batch=40 is not a multiple"):
        run_cpu(tmp_path, "bad", "optim.effective_batch=40")


def test_metrics_jsonl_records_every_logged_step(tmp_path):
    _, run_dir = run_cpu(tmp_path, "m", "schedule.max_steps=4", "run.log_every=2")
    records = read_metrics(str(run_dir))
    assert [r["step"] for r in records] == [2, 4]
    assert set(records[0]) == {"step", "loss", "ar_loss", "kd_loss", "grad_norm", "lr", "data_skipped"}
    assert (run_dir / "tb").is_dir()
    json.dumps(records)


@needs_xla
def test_xla_rejects_torch_compile():
    with pytest.raises(BackendError, match="already compiles the whole step"):
        create_backend("xla").compile_module(torch.nn.Linear(2, 2))


def test_torch_xla_is_imported_only_by_the_xla_backend():
    """A future native TPU backend then replaces one package: every torch_xla call of the library, the parity harness
    and the tools lives in backend/xla/ (backend/__init__.py only asks whether it can be imported)."""
    import re

    importers = {
        str(path.relative_to(REPO))
        for folder in ("digpt_xla", "parity", "tools")
        for path in (REPO / folder).rglob("*.py")
        if re.search(r"^\s*(import|from) torch_xla", path.read_text(), flags=re.M)
    }
    assert {path for path in importers if not path.startswith("digpt_xla/backend/xla/")} == {
        "digpt_xla/backend/__init__.py"
    }, importers
    assert "digpt_xla/backend/xla/pjrt.py" in importers and "digpt_xla/backend/xla/spmd.py" in importers
