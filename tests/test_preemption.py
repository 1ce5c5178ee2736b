"""Preemption agreed across ranks: a SIGTERM that reaches one rank (or reaches two ranks 1.5 s apart, as notices
reach hosts) stops every rank at the same step with one complete checkpoint; SIGINT behaves as SIGTERM; a second
signal ends a process at once, even while it waits in a collective for a rank that will never come. Each test
ends by itself within its timeouts: a hang fails it, it never blocks the suite."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, subprocess_env, torchrun
from digpt_xla.checkpoint.manager import CheckpointManager
from digpt_xla.engine.metrics import read_metrics

pytestmark = pytest.mark.multiprocess  # torchrun runs signalled from outside

TINY = [
    "--config",
    "yaml/demo.yaml",
    "backend.name=cpu",
    "run.progress=false",
    "run.knn_eval=false",
    "model.depth=2",
    "model.embed_dim=32",
    "model.num_heads=2",
    "data.batch_size=8",
    "run.log_every=1",
    "run.ckpt_every=0",
    "schedule.max_steps=100000",
]


def _torchrun(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [
        *torchrun(2),
        "-m",
        "digpt_xla.cli",
        "pretrain",
        *TINY,
        f"run.out_dir={out}",
        *overrides,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _alone(out: Path) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "digpt_xla.cli", "pretrain", *TINY, f"run.out_dir={out}"]
    return subprocess.Popen(
        cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _workers(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children with RANK in their environment)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(entry)
    return found


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> dict[int, int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_metrics(str(out))):
            workers = _workers(proc.pid)
            if len(workers) == 2:
                return workers
        time.sleep(0.1)
    _kill_everything(proc)
    pytest.fail(f"the run did not reach step {step} in {timeout}s")


def _kill_everything(proc: subprocess.Popen, workers: dict[int, int] | None = None) -> None:
    """SIGKILL torchrun and each of its workers. torchrun starts every worker in a session of its own, so killing
    torchrun's group leaves them running, holding the stderr pipe open: a worker whose peer is gone can wait in a
    collective for minutes, and `communicate` would wait with it."""
    pids = set((workers or {}).values()) | set(_workers(proc.pid).values())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too; it needs no SIGCONT


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_everything(proc)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"still running {timeout}s after the signal (hung): {err[-3000:]}")
    return err


@pytest.mark.parametrize("who", ["one rank", "both ranks 1.5 s apart"])
def test_a_signal_to_some_ranks_stops_all_at_one_step_with_a_checkpoint(tmp_path, who):
    out = tmp_path / "run"
    proc = _torchrun(out, "backend.fsdp=2")  # FSDP2: a rank that stopped alone left the other in an all-gather
    workers = _wait_for_step(proc, out, 3)
    os.kill(workers[1], signal.SIGTERM)
    if who != "one rank":
        time.sleep(1.5)
        os.kill(workers[0], signal.SIGTERM)
    err = _finish(proc, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = CheckpointManager(str(out / "checkpoints")).complete_steps()
    assert len(steps) == 1 and steps[0] >= 3, steps
    logged = max(r["step"] for r in read_metrics(str(out)) if "loss" in r)
    assert logged == steps[0], "the checkpoint is of the step at which every rank stopped"
    assert (out / "checkpoints" / f"ckpt-{steps[0]:08d}" / "meta.pt").is_file()


def test_a_second_signal_ends_a_rank_blocked_in_a_collective(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(out)
    workers = _wait_for_step(proc, out, 2)
    os.kill(workers[1], signal.SIGSTOP)  # rank 0 now waits in its next collective for a rank that never comes
    try:
        time.sleep(2.0)
        os.kill(workers[0], signal.SIGTERM)  # noted, but the step boundary is never reached
        time.sleep(1.0)
        assert Path(f"/proc/{workers[0]}").exists(), "one signal does not end the rank"
        started = time.time()
        os.kill(workers[0], signal.SIGTERM)
        while Path(f"/proc/{workers[0]}").exists() and _state(workers[0]) != "Z" and time.time() - started < 20:
            time.sleep(0.05)
        assert time.time() - started < 20, "rank 0 still runs 20 s after a second SIGTERM"
    finally:
        _kill_everything(proc, workers)
        proc.communicate(timeout=60)
    assert not CheckpointManager(str(out / "checkpoints")).complete_steps(), "no checkpoint after a hard stop"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def test_ctrl_c_checkpoints_and_stops_like_sigterm(tmp_path):
    out = tmp_path / "run"
    proc = _alone(out)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or not read_metrics(str(out)):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = _finish(proc, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "received SIGINT" in err
    assert CheckpointManager(str(out / "checkpoints")).complete_steps()


def test_a_second_run_on_a_busy_run_directory_refuses_naming_the_holder(tmp_path, capsys):
    from digpt_xla.cli import main as digpt_main

    out = tmp_path / "run"
    first = _alone(out)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or not read_metrics(str(out)):
            assert time.time() < deadline and first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.05)
        code = digpt_main(["pretrain", *TINY, f"run.out_dir={out}", "run.resume=auto"])
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(err) == 1, err
        assert f"pid {first.pid}" in err[0] and "in use by another run" in err[0]
        steps = [r["step"] for r in read_metrics(str(out))]
        assert steps == sorted(steps), "the log is the first run's alone"
    finally:
        first.kill()
        first.communicate(timeout=60)


def test_a_lease_of_a_dead_or_silent_run_is_taken_over_and_a_live_one_is_not(tmp_path, caplog):
    import json
    import socket

    from digpt_xla.rundir import RunDir, RunDirError, RunLease

    gone = subprocess.Popen(["true"])
    gone.wait()
    held = {
        "dead process on this host": ({"host": socket.gethostname(), "pid": gone.pid, "heartbeat": time.time()}, True),
        "silent other host": ({"host": "tpu-vm-7", "pid": 1, "heartbeat": time.time() - 600}, True),
        "live other host": ({"host": "tpu-vm-7", "pid": 1, "heartbeat": time.time() - 5}, False),
        # No clock is 100000 s ahead: such a lease would never go stale, so it does not bind.
        "heartbeat from the future": ({"host": "tpu-vm-7", "pid": 1, "heartbeat": time.time() + 99999}, True),
    }
    for name, (record, free) in held.items():
        run = tmp_path / name.replace(" ", "_")
        run.mkdir()
        (run / "lease.json").write_text(json.dumps({"owner": "someone", **record}))
        lease = RunLease(RunDir(str(run)))
        if free:
            lease.acquire(settle=0)
            assert json.loads((run / "lease.json").read_text())["owner"] == lease.owner
            assert "taking over the lease" in caplog.text
            lease.release()
            assert not (run / "lease.json").exists()
        else:
            with pytest.raises(RunDirError, match="in use by another run .host tpu-vm-7 pid 1, heartbeat 5s ago"):
                lease.acquire(settle=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        RunLease(RunDir(str(tmp_path / "file"))).acquire()
    # A lease of the wrong shape is named with its field, never half-read into a traceback.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "lease.json").write_text(json.dumps({"owner": "x", "host": "h", "pid": "12", "heartbeat": 1.0}))
    with pytest.raises(RunDirError, match=r"lease.json: field 'pid' is '12', not an integer; if no run uses"):
        RunLease(RunDir(str(bad))).acquire(settle=0)


def test_a_run_whose_directory_was_taken_over_writes_no_further_metric(tmp_path, monkeypatch):
    # Paused past the takeover and resumed, the old holder must not append to the new run's log before it notices.
    import json

    from digpt_xla.config import load_config
    from digpt_xla.engine import Pretrainer
    from digpt_xla.rundir import RunDirError

    cfg = load_config(TINY[1], [*TINY[2:], "schedule.max_steps=6", f"run.out_dir={tmp_path}"])

    def taken_over_after_step_2(self):
        if self.step == 2:
            record = {"owner": "another run", "host": "tpu-vm-9", "pid": 1, "heartbeat": time.time()}
            (tmp_path / "lease.json").write_text(json.dumps(record))

    monkeypatch.setattr(Pretrainer, "after_step", taken_over_after_step_2)
    with pytest.raises(RunDirError, match="taken over by host tpu-vm-9"):
        Pretrainer(cfg).train()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert json.loads((tmp_path / "lease.json").read_text())["owner"] == "another run"  # not released over it


def test_after_a_stop_the_signals_are_ignored_only_until_the_run_has_cleaned_up():
    # A study or a notebook goes on after a preempted run: Ctrl-C must work again there. Only a command that exits
    # next keeps ignoring them (digpt pretrain / finetune).
    from digpt_xla.engine.signals import PreemptionFlag

    before = signal.getsignal(signal.SIGINT)
    flag = PreemptionFlag()
    assert signal.getsignal(signal.SIGINT) is not before
    flag.ignore_further()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    flag.restore()
    assert signal.getsignal(signal.SIGINT) is before
