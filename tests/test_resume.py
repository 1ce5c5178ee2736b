"""The one resume path: finetuning (EMA, Mixup/CutMix, drop path) resumes exactly after a stop, SIGTERM or SIGKILL;
``run.resume=<path>`` in both trainers; a corrupt newest checkpoint falls back to the previous one."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST_CPU, PYTHON, REPO, subprocess_env
from digpt_xla.checkpoint.manager import CheckpointManager
from digpt_xla.checkpoint.reader import CheckpointError, read_checkpoint
from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer
from digpt_xla.engine.finetune import Finetuner
from digpt_xla.engine.metrics import read_metrics
from digpt_xla.rundir import RunDirError

# The release's regularisers on the tiny model: mixup 0.8, cutmix 1.0, drop path 0.1, EMA.
FINETUNE = [
    "finetune.mixup=0.8",
    "finetune.cutmix=1.0",
    "finetune.drop_path=0.1",
    "finetune.ema=true",
    "finetune.ema_decay=0.9",
    "data.batch_size=16",
    "finetune.eval_batch_size=128",
    "run.log_every=1",
    "run.ckpt_every=10",
    "schedule.warmup_epochs=0.1",
    "run.progress=false",
    "model.depth=2",
]


def _finetune_cmd(out, *overrides):
    return [
        PYTHON,
        "-m",
        "digpt_xla.cli",
        "finetune",
        "--config",
        "yaml/finetune/tiny_digits.yaml",
        *FINETUNE,
        f"run.out_dir={out}",
        *overrides,
    ]


def _deterministic_env() -> dict[str, str]:
    """One thread per process: a run and its resumed half are compared bit for bit, and with several threads the
    CPU kernels may split a sum differently from one process to the next when the cores are busy (a loss 1 ulp
    apart at step 8, before any interruption, under load in CI)."""
    return subprocess_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_DYNAMIC="FALSE")


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "reference"
    subprocess.run(
        _finetune_cmd(out, "schedule.max_steps=30"),
        cwd=REPO,
        env=_deterministic_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out, json.loads((out / "finetune.json").read_text())


def _interrupt(out, sig) -> int:
    proc = subprocess.Popen(
        _finetune_cmd(out, "schedule.max_steps=30"),
        cwd=REPO,
        env=_deterministic_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, deadline = Path(out) / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == (0 if sig == signal.SIGTERM else -signal.SIGKILL), err[-2000:]
    return CheckpointManager(str(Path(out) / "checkpoints")).complete_steps()[-1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["stop", "sigterm", "sigkill"])
def test_finetune_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted, how):
    ref_dir, reference = uninterrupted
    out = tmp_path / "resumed"
    if how == "stop":
        subprocess.run(
            _finetune_cmd(out, "schedule.max_steps=20"),
            cwd=REPO,
            env=_deterministic_env(),
            check=True,
            capture_output=True,
            timeout=600,
        )
        assert CheckpointManager(str(out / "checkpoints")).complete_steps()[-1] == 20
    else:
        stopped = _interrupt(out, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        assert stopped >= 10
    proc = subprocess.run(
        _finetune_cmd(out, "schedule.max_steps=30", "run.resume=auto"),
        cwd=REPO,
        env=_deterministic_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr
    result = json.loads((out / "finetune.json").read_text())
    for key in ("top1", "top5", "ema_top1", "ema_top5"):
        assert result[key] == reference[key], key
    resumed, ref = _losses(out), _losses(ref_dir)
    assert sorted(resumed) == list(range(1, 31)), "one loss per step, nothing lost or repeated"
    assert [resumed[s] for s in range(1, 31)] == [ref[s] for s in range(1, 31)]
    state = read_checkpoint(str(out / "checkpoints" / "ckpt-00000030.pt"))
    assert {"ema", "mixup_rng", "evals", "rng", "optimizer"} <= set(state) and state["kind"] == "finetune"


def _pretrain_cfg(out, *overrides):
    return load_config(
        REPO / "yaml/demo.yaml",
        [
            "backend.name=cpu",
            "data.batch_size=16",
            "run.log_every=1",
            "run.knn_eval=false",
            "run.progress=false",
            "model.depth=2",
            f"run.out_dir={out}",
            *overrides,
        ],
    )


def test_resume_from_a_given_checkpoint_in_both_trainers(tmp_path):
    Pretrainer(_pretrain_cfg(tmp_path / "a", "schedule.max_steps=4", "run.ckpt_every=2")).train()
    ckpt2 = str(tmp_path / "a" / "checkpoints" / "ckpt-00000002.pt")
    b = Pretrainer(_pretrain_cfg(tmp_path / "b", "schedule.max_steps=4", f"run.resume={ckpt2}"))
    assert b.step == 2
    b.train()
    assert [_losses(tmp_path / "b")[s] for s in (3, 4)] == [_losses(tmp_path / "a")[s] for s in (3, 4)]

    ft = [
        "backend.name=cpu",
        "data.batch_size=16",
        "schedule.max_steps=4",
        "run.ckpt_every=2",
        "run.progress=false",
        "model.depth=2",
        "finetune.eval_every_epochs=0",
    ]
    cfg = load_config(REPO / "yaml/finetune/tiny_digits.yaml", [*ft, f"run.out_dir={tmp_path / 'fa'}"])
    first = Finetuner(cfg).train()
    ft2 = str(tmp_path / "fa" / "checkpoints" / "ckpt-00000002.pt")
    cfg = load_config(
        REPO / "yaml/finetune/tiny_digits.yaml", [*ft, f"run.out_dir={tmp_path / 'fb'}", f"run.resume={ft2}"]
    )
    second = Finetuner(cfg)
    assert second.step == 2
    assert second.train()["top1"] == first["top1"]
    with pytest.raises(CheckpointError, match="a pretrain checkpoint cannot resume finetune"):
        Finetuner(
            load_config(
                REPO / "yaml/finetune/tiny_digits.yaml", [*ft, f"run.out_dir={tmp_path / 'fc'}", f"run.resume={ckpt2}"]
            )
        )
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint not found"):
        Pretrainer(_pretrain_cfg(tmp_path / "d", f"run.resume={tmp_path / 'nope.pt'}"))


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, damage, caplog):
    Pretrainer(_pretrain_cfg(tmp_path, "schedule.max_steps=4", "run.ckpt_every=2")).train()
    newest = tmp_path / "checkpoints" / "ckpt-00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3] if damage == "truncated" else bytes(range(256)) * 40)
    trainer = Pretrainer(_pretrain_cfg(tmp_path, "schedule.max_steps=6", "run.resume=auto"))
    assert trainer.step == 2, "fell back to the previous complete checkpoint"
    assert str(newest) in caplog.text and "cannot be loaded" in caplog.text
    assert (tmp_path / "checkpoints" / "ckpt-00000004.pt.corrupt").exists(), "renamed, not deleted"
    assert (tmp_path / "checkpoints" / "ckpt-00000004.done.corrupt").exists()
    assert CheckpointManager(str(tmp_path / "checkpoints")).complete_steps() == [2]
    trainer.train()
    assert sorted(_losses(tmp_path)) == list(range(1, 7))


def test_optimizer_groups_of_another_model_are_refused_by_name():
    import torch

    from digpt_xla.checkpoint.training_state import with_backend_options

    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))]}, {"params": []}])
    with pytest.raises(CheckpointError, match="has 1 parameter groups, this run builds 2"):
        with_backend_options(optimizer, [{"params": [0], "lr": 1.0}])


def test_a_torn_last_line_of_the_metrics_log_is_dropped_on_resume(tmp_path, caplog):
    overrides = [*FAST_CPU, "run.log_every=1", "run.ckpt_every=2", f"run.out_dir={tmp_path}"]
    Pretrainer(load_config(REPO / "yaml/demo.yaml", [*overrides, "schedule.max_steps=2"])).train()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the write a SIGKILL cut short
    Pretrainer(load_config(REPO / "yaml/demo.yaml", [*overrides, "schedule.max_steps=4", "run.resume=auto"])).train()
    assert [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r] == [1, 2, 3, 4]
    assert "metrics.jsonl:3: dropping a line that is not a whole record" in caplog.text


def test_a_new_run_in_a_used_directory_is_refused_or_moves_the_old_one_aside(tmp_path):
    out = tmp_path / "run"
    Pretrainer(_pretrain_cfg(out, "schedule.max_steps=2")).train()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=r"holds another run \(metrics.jsonl with 2 records to step 2; checkpoints"):
        Pretrainer(_pretrain_cfg(out, "schedule.max_steps=2", "run.resume=never", "run.overwrite=false"))
    assert (out / "metrics.jsonl").read_text() == before, "a refused run leaves the directory as it was"
    Pretrainer(_pretrain_cfg(out, "schedule.max_steps=1", "run.resume=never", "run.overwrite=true")).train()
    (aside,) = (out / "previous").iterdir()
    assert (aside / "metrics.jsonl").read_text() == before
    assert [p.name for p in (aside / "checkpoints").iterdir() if p.suffix == ".pt"] == ["ckpt-00000002.pt"]
    assert sorted(_losses(out)) == [1] and json.loads((out / "run.json").read_text())["kind"] == "pretrain"
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["ckpt-00000001.pt"]  # the old one not pruned


def test_a_damaged_only_checkpoint_is_refused_and_its_history_kept(tmp_path):
    out = tmp_path / "run"
    Pretrainer(_pretrain_cfg(out, "schedule.max_steps=2")).train()
    ckpt = out / "checkpoints" / "ckpt-00000002.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 1
    ckpt.write_bytes(bytes(data))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=r"ckpt-00000002.pt.corrupt.*no checkpoint of it can be loaded"):
        Pretrainer(_pretrain_cfg(out, "schedule.max_steps=4", "run.resume=auto", "run.overwrite=false"))
    assert (out / "metrics.jsonl").read_text() == before


def test_a_resume_of_another_model_is_refused_by_the_run_record(tmp_path):
    out = tmp_path / "run"
    Pretrainer(_pretrain_cfg(out, "schedule.max_steps=2")).train()
    record = json.loads((out / "run.json").read_text())
    record["model"]["name"] = "digpt_vit_base_patch16_224"  # as if that run had been another model's
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(RunDirError, match="holds a pretrain run of digpt_vit_base_patch16_224"):
        Pretrainer(_pretrain_cfg(out, "schedule.max_steps=4", "run.resume=auto"))


def test_a_checkpoint_records_what_each_auto_setting_became(tmp_path):
    # The config as written says auto five times; the run plan beside it says what ran.
    autos = [
        "backend.name=auto",
        "teacher.precision=auto",
        "teacher.placement=auto",
        "optim.implementation=auto",
        "optim.effective_batch=64",
        "data.batch_size=16",
    ]
    common = ["run.progress=false", "run.knn_eval=false", "model.depth=2", "run.ckpt_every=2"]
    out = tmp_path / "run"

    def train(steps: int, resume: str):
        overrides = [*common, *autos, f"schedule.max_steps={steps}", f"run.resume={resume}", f"run.out_dir={out}"]
        return Pretrainer(load_config(REPO / "yaml/demo.yaml", overrides)).train()

    train(2, "never")
    resumed = train(4, "auto")
    state = read_checkpoint(resumed.checkpoint)
    assert state["config"]["backend"]["name"] == "auto" and state["config"]["teacher"]["precision"] == "auto"
    plan = state["plan"]
    assert plan["backend"] == "cpu" and plan["devices"] == 1 and plan["data_parallel"] == 1 and plan["fsdp"] == 1
    assert plan["teacher_precision"] == "fp32" and plan["teacher_placement"] == "replicated"
    assert plan["adamw"] == "for-loop" and plan["attention"] == "sdpa" and plan["blocks"] == "in order"
    assert plan["batch_per_device"] == 16 and plan["accumulation"] == 4 and plan["effective_batch"] == 64
    assert plan["lr"] == pytest.approx(state["config"]["optim"]["blr"] * 64 / 256)
    assert plan["start_step"] == 2 and plan["end_step"] == 4, "the resumed invocation's own plan"
    # run.json keeps the plan of the run that started the directory.
    assert json.loads((out / "run.json").read_text())["plan"]["start_step"] == 0


def test_the_checkpoint_is_assembled_from_stateful_parts_that_restore_themselves(tmp_path):
    """The trainer (step, loss scaler, data position, model shape) gives its part of a checkpoint as one state_dict
    and takes it back with load_state_dict; the checkpoint layer adds model, optimizer, RNG, config, plan. The
    keys stay those released checkpoints and earlier runs have."""
    overrides = [
        "backend.name=cpu",
        "run.progress=false",
        "run.knn_eval=false",
        "model.depth=2",
        "data.batch_size=16",
        "optim.accum_steps=2",
        "schedule.max_steps=3",
        f"run.out_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(REPO / "yaml/demo.yaml", overrides)
    state = read_checkpoint(Pretrainer(cfg).train().checkpoint)
    assert set(state) == {
        "model",
        "optimizer",
        "kind",
        "rng",
        "config",
        "plan",
        "git_revision",
        "step",
        "scaler",
        "data",
        "model_config",
    }
    assert state["data"]["consumed_batches"] == 3 * 2 and state["data"]["process_batch"] == 16

    cfg.run.out_dir, cfg.run.resume = str(tmp_path / "other"), "never"
    fresh = Pretrainer(cfg)
    own = {k: state[k] for k in ("step", "scaler", "data", "model_config")}
    fresh.load_state_dict(own | {"data": own["data"] | {"skipped_samples": 5}}, "test")
    assert fresh.step == 3 and fresh.data.skipped == 5
    assert fresh.state_dict()["data"] == own["data"] | {"skipped_samples": 5}
    # The schedule reads the plan: the peak lr is the plan's at the end of the warmup.
    plan = fresh.plan
    assert fresh.lr(plan.warmup_steps) == pytest.approx(plan.lr) and plan.accumulation == 2
