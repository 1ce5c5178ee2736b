"""Checkpoints that are complete or refused: a sharded checkpoint is committed only with every tensor in it; its
marker records each file's size and SHA-256, so a truncated, missing or foreign file is named, set aside and the
previous checkpoint used; files of the wrong structure are one line each; the release's own checkpoints load."""

import argparse
import json
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from conftest import FAST_CPU, PYTHON, REPO, subprocess_env
from digpt_xla.checkpoint.manager import CheckpointManager
from digpt_xla.checkpoint.reader import CheckpointError, load_model_state, read_checkpoint, read_state_dict
from digpt_xla.cli import main as digpt_main
from digpt_xla.config import load_config
from digpt_xla.engine import Pretrainer
from digpt_xla.engine.finetune import Finetuner
from digpt_xla.models import create_digpt

CPU = [*FAST_CPU, "run.log_every=1"]


def _sharded(manager: CheckpointManager, step: int, tensors: dict, expected: dict | None = None) -> str:
    """A sharded checkpoint written the way a trainer writes one, by one process."""
    meta = {"step": step, "rng": {}, "optimizer_param_groups": [], "kind": "pretrain"}

    def write(url: str) -> None:
        dcp.save(tensors, storage_writer=FsspecWriter(url), no_dist=True)

    shapes = {f"model.{k}": tuple(v.shape) for k, v in tensors["model"].items()}
    return manager.save_sharded(step, meta, write, is_main=True, expected=expected or shapes)


def test_an_incomplete_sharded_checkpoint_is_never_committed(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    _sharded(manager, 3, {"model": {"w": torch.ones(4, 2)}})
    expected = {"model.w": (4, 2), "model.v": (3,)}
    with pytest.raises(CheckpointError, match=r"refusing to commit .*ckpt-00000006: it lacks 'model.v' \(holds 1 of"):
        _sharded(manager, 6, {"model": {"w": torch.ones(4, 2)}}, expected)
    with pytest.raises(CheckpointError, match=r"'model.w' has shape \(4, 2\), the run's is \(8, 2\)"):
        _sharded(manager, 9, {"model": {"w": torch.ones(4, 2)}}, {"model.w": (8, 2)})

    def lost_shard(url: str) -> None:  # a rank whose shard went to a disk the main rank does not see
        dcp.save({"model": {"w": torch.ones(4, 2)}}, storage_writer=FsspecWriter(url), no_dist=True)
        next(p for p in (tmp_path / url.rsplit("/", 1)[-1]).iterdir() if p.suffix == ".distcp").unlink()

    meta = {"step": 12, "rng": {}, "optimizer_param_groups": [], "kind": "pretrain"}
    with pytest.raises(CheckpointError, match=r"ckpt-00000012/__0_0.distcp: missing .*one shared run.out_dir"):
        manager.save_sharded(12, meta, lost_shard, is_main=True, expected={"model.w": (4, 2)})
    assert manager.complete_steps() == [3], "nothing after the complete one is committed"


@pytest.mark.parametrize("damage", ["truncated shard", "missing shard", "shard of an older checkpoint", "meta.pt"])
def test_a_damaged_sharded_checkpoint_is_named_set_aside_and_the_previous_one_used(tmp_path, damage, caplog):
    manager = CheckpointManager(str(tmp_path))
    _sharded(manager, 3, {"model": {"w": torch.zeros(64)}})
    _sharded(manager, 6, {"model": {"w": torch.ones(64)}})
    shard, older = tmp_path / "ckpt-00000006/__0_0.distcp", tmp_path / "ckpt-00000003/__0_0.distcp"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "missing shard":
        shard.unlink()
    elif damage == "shard of an older checkpoint":
        shard.write_bytes(older.read_bytes())  # same name, same size: only the checksum tells
    else:
        torch.save({"step": 6, "rng": {}, "optimizer_param_groups": [], "kind": "pretrain"}, shard.parent / "meta.pt")
    with pytest.raises(CheckpointError, match="ckpt-00000006/(__0_0.distcp|meta.pt): "):
        read_checkpoint(str(tmp_path / "ckpt-00000006"))
    url, state = manager.load_latest()
    assert state["step"] == 3 and url.endswith("ckpt-00000003")
    assert "ckpt-00000006/" in caplog.text, "the damaged file is named"
    assert (tmp_path / "ckpt-00000006.corrupt").is_dir() and (tmp_path / "ckpt-00000006.done.corrupt").exists()
    assert torch.equal(read_state_dict(url)["w"], torch.zeros(64))


@pytest.mark.multiprocess
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_an_uncommitted_sharded_checkpoint_names_its_missing_or_short_file(tmp_path, capsys, damage):
    # A half-written or half-copied checkpoint has no commit record to check against: its own metadata says which
    # files and bytes it needs. The converter used to print DCP's stack frames instead of the file.
    url = tmp_path / "ckpt-00000006"
    dcp.save({"model": {"w": torch.ones(64)}}, storage_writer=FsspecWriter(str(url)), no_dist=True)
    torch.save({"step": 6, "rng": {}, "optimizer_param_groups": [], "kind": "pretrain"}, url / "meta.pt")
    shard = url / "__0_0.distcp"
    shard.unlink() if damage == "missing" else shard.write_bytes(shard.read_bytes()[:100])
    expected = f"{shard}: missing" if damage == "missing" else f"{shard}: 100 bytes, the checkpoint's metadata reads"
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(str(url))
    proc = subprocess.run(
        [PYTHON, "tools/convert_checkpoint.py", "--format", "release", str(url), str(tmp_path / "out.pth")],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "FrameSummary" not in proc.stderr


def test_the_marker_lists_every_file_with_size_and_sha256(tmp_path):
    Pretrainer(load_config(REPO / "yaml/demo.yaml", [*CPU, "schedule.max_steps=1", f"run.out_dir={tmp_path}"])).train()
    record = json.loads((tmp_path / "checkpoints/ckpt-00000001.done").read_text())
    size = (tmp_path / "checkpoints/ckpt-00000001.pt").stat().st_size
    assert (
        record["files"]["ckpt-00000001.pt"]["size"] == size and len(record["files"]["ckpt-00000001.pt"]["sha256"]) == 64
    )


def _release_checkpoint(path) -> dict:
    """A checkpoint as the release (MAE's misc.save_model) writes it: model, optimizer, epoch, scaler and args."""
    model = create_digpt("digpt_tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    args = argparse.Namespace(
        model="digpt_vit_base_patch16",
        batch_size=64,
        blr=1.5e-4,
        output_dir="./out",
        input_size=224,
        norm_pix_loss=False,
        resume="",
        dist_url="env://",
        epochs=300,
        betas=(0.9, 0.95),
        device="cuda",
        world_size=32,
    )
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": 299,
            "scaler": torch.amp.GradScaler("cpu").state_dict(),
            "args": args,
        },
        path,
    )
    return model.state_dict()


@pytest.mark.multiprocess
def test_the_releases_checkpoints_load_everywhere_a_checkpoint_is_accepted(tmp_path):
    path = tmp_path / "checkpoint-299.pth"
    reference = _release_checkpoint(path)
    state = read_state_dict(str(path))
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    load_model_state(create_digpt("digpt_tiny"), state, str(path))  # probe.checkpoint loads this way
    ft = ["backend.name=cpu", "run.progress=false", f"finetune.checkpoint={path}", f"run.out_dir={tmp_path / 'ft'}"]
    finetuner = Finetuner(load_config(REPO / "yaml/finetune/tiny_digits.yaml", ft))
    assert torch.equal(
        finetuner.backend.unwrap(finetuner.model).patch_embed.proj.weight, reference["patch_embed.proj.weight"]
    )
    for fmt, extra in (("release", []), ("timm", ["--num-classes", "10"])):
        cmd = [PYTHON, "tools/convert_checkpoint.py", str(path), str(tmp_path / f"{fmt}.pth"), "--format", fmt, *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.multiprocess
def test_the_converter_takes_the_head_count_from_the_checkpoints_config(tmp_path):
    overrides = [*CPU, "model.depth=2", "model.num_heads=8", "schedule.max_steps=1", f"run.out_dir={tmp_path}"]
    Pretrainer(load_config(REPO / "yaml/demo.yaml", overrides)).train()
    ckpt = tmp_path / "checkpoints/ckpt-00000001.pt"
    cmd = [PYTHON, "tools/convert_checkpoint.py", str(ckpt), str(tmp_path / "t.pth"), "--num-classes", "10"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "num_heads=8," in proc.stdout and "guessed" not in proc.stdout, proc.stdout


STRUCTURE = {
    "no optimizer": ({}, "optimizer", "no 'optimizer' entry"),
    "step is text": ({"step": "six"}, "", "entry 'step' is a str, expected int"),
    "negative step": ({"step": -6}, "", "entry 'step' is -6"),
    "step past any run": ({"step": 10**30}, "", "entry 'step' is 1000000000000000000000000000000, not a step count"),
    "bad rng": ({"rng": {"python": 3}}, "", "entry 'rng' is not a random-generator state"),
    "not a dict": (None, "", "holds a list"),
}


@pytest.fixture(scope="module")
def demo_state(demo_checkpoint):
    return torch.load(demo_checkpoint, weights_only=True)


DEMO_SHAPE = [o for o in CPU if not o.startswith("model.")]  # the shared demo run's model


@pytest.mark.parametrize("case", list(STRUCTURE))
def test_a_checkpoint_of_the_wrong_structure_is_one_line_and_exit_2(tmp_path, capsys, demo_state, case):
    change, drop, message = STRUCTURE[case]
    state = [1, 2] if change is None else {k: v for k, v in demo_state.items() if k != drop} | change
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    code = digpt_main(
        ["pretrain", "--config", "yaml/demo.yaml", *DEMO_SHAPE, f"run.resume={path}", f"run.out_dir={tmp_path / 'run'}"]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_resuming_with_another_model_shape_is_one_line(tmp_path, capsys, demo_state):
    path = tmp_path / "ckpt.pt"
    torch.save(demo_state, path)
    code = digpt_main(
        [
            "pretrain",
            "--config",
            "yaml/demo.yaml",
            *DEMO_SHAPE,
            "model.embed_dim=32",
            f"run.resume={path}",
            f"run.out_dir={tmp_path / 'run'}",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1 and "has shape" in err[0], err


@pytest.mark.multiprocess
def test_the_converter_names_what_it_was_handed(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    for given, expected in (
        ("notes.txt", "notes.txt: unsupported checkpoint type .txt; a checkpoint is a"),
        ("folder", "folder: a directory without meta.pt, not a sharded checkpoint; a checkpoint is a"),
    ):
        cmd = [
            PYTHON,
            "tools/convert_checkpoint.py",
            str(tmp_path / given),
            str(tmp_path / "o.pth"),
            "--format",
            "release",
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and expected in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def _under_a_file_size_limit(limit: int):
    """A child's files may not grow past ``limit`` bytes (RLIMIT_FSIZE): a write beyond it fails with EFBIG, as
    one on a full disk fails with ENOSPC (Python ignores SIGXFSZ, so the write raises instead of killing)."""
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


TINY_RUN = ["--config", "yaml/demo.yaml", *FAST_CPU, "model.embed_dim=32", "model.num_heads=2", "run.ckpt_every=2"]


@pytest.mark.multiprocess
def test_a_save_that_fails_for_space_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = [PYTHON, "-m", "digpt_xla.cli", "pretrain", *TINY_RUN, f"run.out_dir={out}"]
    first = subprocess.run([*common, "schedule.max_steps=4"], cwd=REPO, env=subprocess_env(), capture_output=True)
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    records = (out / "metrics.jsonl").read_bytes()
    size = (out / "checkpoints" / "ckpt-00000004.pt").stat().st_size
    # Room for the logs, not for another checkpoint.
    proc = subprocess.run(
        [*common, "schedule.max_steps=8", "run.resume=auto"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_under_a_file_size_limit(size // 2),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        f"could not write {out}/checkpoints/ckpt-00000006.pt (OSError: [Errno 27] File too large); the newest "
        f"complete checkpoint, {out}/checkpoints/ckpt-00000004.pt, is kept" in proc.stderr
    ), proc.stderr[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"ckpt-0000000{s}{x}" for s in (2, 4) for x in (".done", ".pt")], "no partial file left"
    assert read_checkpoint(str(out / "checkpoints" / "ckpt-00000004.pt"))["step"] == 4
    assert (out / "metrics.jsonl").read_bytes().startswith(records), "the log is appended to, never cut"
    assert not (out / "lease.json").exists(), "the lease is given back"


@pytest.mark.multiprocess
def test_a_sharded_save_that_fails_for_space_stops_every_rank_with_one_line(tmp_path):
    from conftest import torchrun

    # FSDP2 writes in the background: the failure surfaces on every rank at the next save, none left in DCP's
    # collectives or the step's.
    out = tmp_path / "run"
    cmd = [*torchrun(2), "-m", "digpt_xla.cli", "pretrain", *TINY_RUN, "backend.fsdp=2", "data.batch_size=8"]
    proc = subprocess.run(
        [*cmd, "schedule.max_steps=6", f"run.out_dir={out}"],
        cwd=REPO,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_under_a_file_size_limit(100 * 1024),
    )
    assert proc.returncode != 0
    line = f"digpt: error: could not write {out}/checkpoints/ckpt-00000002 (OSError: [Errno 27] File too large)"
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [], "the partial checkpoint is removed"


@pytest.mark.multiprocess
def test_logs_that_cannot_grow_stop_the_run_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "digpt_xla.cli",
            "pretrain",
            *TINY_RUN,
            "run.ckpt_every=0",
            "run.log_every=1",
            f"run.out_dir={out}",
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_under_a_file_size_limit(8 * 1024),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "digpt: error: could not log step " in proc.stderr and f"in {out}: File too large" in proc.stderr
    assert not (out / "lease.json").exists(), "the lease is given back"
