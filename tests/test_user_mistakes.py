"""Mistakes found by trying the scale-out features as a new user would: each is refused at start with one line
and exit 2, or handled (a torn log line dropped, a symlink loop followed once), never a traceback, a hang or a
wrong result without a word."""

import importlib.util
import json
import os
import re
import subprocess
import time

import pytest
from test_data import digits, image_folder, make_set, source

from conftest import HAS_XLA, PYTHON, REPO, subprocess_env
from digpt_xla.cli import main as digpt_main
from digpt_xla.data import DataError, build_train_loader
from digpt_xla.data.imagefolder import scan_image_folder
from digpt_xla.entry import one_line
from parity.__main__ import main as parity_main

CPU = [
    "--config",
    "yaml/demo.yaml",
    "backend.name=cpu",
    "run.progress=false",
    "run.knn_eval=false",
    "model.depth=2",
    "data.batch_size=16",
]


def _one_line_exit_2(code: int, capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


XLA_ENVIRONMENT = [
    ("PJRT_DEVICE", "GPU", "PJRT_DEVICE=GPU: torch_xla 2.9 runs"),
    ("CPU_NUM_DEVICES", "0", "CPU_NUM_DEVICES='0'"),
    ("CPU_NUM_DEVICES", "abc", "CPU_NUM_DEVICES='abc'"),
]


@pytest.mark.skipif(not HAS_XLA, reason="needs torch_xla")
@pytest.mark.parametrize(("var", "value", "expected"), XLA_ENVIRONMENT)
def test_xla_environment_mistakes_are_one_line(tmp_path, capsys, monkeypatch, var, value, expected):
    monkeypatch.setenv(var, value)
    code = digpt_main(["pretrain", *CPU, "backend.name=xla", f"run.out_dir={tmp_path}"])
    assert expected in _one_line_exit_2(code, capsys)


DATA_URLS = [
    ("gs://bucket/train-{0..3}.tar", "gs:// needs a package"),
    ("http://host/train-0.tar", "http:// needs a package"),
    ("nosuchfs://x/train-0.tar", "unknown protocol nosuchfs://"),
]


@pytest.mark.parametrize(("url", "expected"), DATA_URLS)
def test_data_urls_without_their_filesystem_package_are_one_line(tmp_path, capsys, url, expected):
    try:
        import fsspec

        fsspec.get_filesystem_class(url.split("://")[0])
        if "nosuchfs" not in url:
            pytest.skip("the filesystem package is installed here")
    except (ImportError, ValueError):
        pass
    code = digpt_main(["pretrain", *CPU, "data.source=webdataset", f"data.urls={url}", f"run.out_dir={tmp_path}"])
    assert expected in _one_line_exit_2(code, capsys)


MANIFESTS = [  # (manifest.json, the error as a regular expression)
    ([1, 2], "a JSON list, not a manifest"),
    ({"shards": []}, "'shards' must map shard file names"),
    ({"shards": {"shard-000000.tar": "ten"}}, r"shards\['shard-000000.tar'\] = 'ten' is not"),
    ({"shards": {"shard-000000.tar": 10}, "num_classes": 0}, "num_classes = 0"),
]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("manifest", "expected"), MANIFESTS)
def test_a_manifest_of_the_wrong_shape_is_named_here_and_in_make_shards_check(tmp_path, manifest, expected):
    make_set(str(tmp_path), digits(10), per_shard=10)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"manifest.json: {expected}"):
        source(str(tmp_path / "shard-000000.tar"))
    proc = subprocess.run(
        [PYTHON, "tools/make_shards.py", "check", str(tmp_path), "--no-progress"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and re.search(expected, proc.stderr) and "Traceback" not in proc.stderr, proc.stderr


def test_more_workers_than_shards_is_refused_when_the_loader_is_built(tmp_path):
    make_set(str(tmp_path), digits(40), per_shard=10)  # 4 shards
    src = source(str(tmp_path / "shard-{000000..000003}.tar"))
    with pytest.raises(DataError, match=r"4 shards cannot be split over 1 ranks x 6 workers \(data.num_workers\)"):
        build_train_loader(src, 4, 0, 1, 0, 0, num_workers=6)
    assert build_train_loader(src, 4, 0, 1, 0, 0, num_workers=4) is not None


@pytest.mark.multiprocess
def test_a_fifo_manifest_stalls_into_one_line_and_the_process_exits(tmp_path):
    """A read that never answers: the error names the file after data.read_timeout, and no reader thread keeps
    the failed process alive (they are daemon threads)."""
    make_set(str(tmp_path), digits(10), per_shard=10)
    (tmp_path / "manifest.json").unlink()
    os.mkfifo(tmp_path / "manifest.json")
    cmd = [
        PYTHON,
        "-m",
        "digpt_xla.cli",
        "pretrain",
        *CPU,
        "data.source=webdataset",
        "data.read_timeout=2",
        f"data.urls={tmp_path / 'shard-000000.tar'}",
        f"run.out_dir={tmp_path / 'run'}",
    ]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "manifest.json: read: no answer in 2s" in errors[0], (
        proc.stderr
    )
    assert time.time() - started < 60


def test_an_error_in_a_data_loader_worker_is_shown_by_its_own_message():
    from torch.utils.data import DataLoader, Dataset

    class Stalled(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise DataError("gs://bucket/shard-000007.tar: read: no answer in 120s (data.read_timeout)")

    with pytest.raises(DataError) as raised:
        next(iter(DataLoader(Stalled(), num_workers=1)))
    shown = one_line(raised.value)
    assert shown.startswith("gs://bucket/shard-000007.tar: read: no answer in 120s") and "\n" not in shown
    assert "worker process 0" in shown


def test_a_symlink_loop_in_an_image_folder_is_followed_once(tmp_path, caplog):
    root = image_folder(tmp_path, per_class=5)
    os.symlink(root / "0", root / "0" / "again")  # a loop: 0/again/again/... is 0 itself
    os.symlink(root / "1", root / "2" / "elsewhere")  # a link to another real folder is followed
    samples, classes = scan_image_folder(str(root))
    per_class = {c: sum(1 for _, label in samples if label == i) for c, i in classes.items()}
    assert per_class == {"0": 5, "1": 5, "2": 10}, per_class
    assert "leads back to" in caplog.text


@pytest.mark.parametrize("value", ["nan", "-1"])
def test_parity_tolerances_must_be_finite_and_not_negative(tmp_path, capsys, value):
    code = parity_main(
        ["run", "--config", "yaml/parity/tiny_fp32.yaml", f"tolerances.loss_rel={value}", "--out", str(tmp_path / "r")]
    )
    assert "tolerances.loss_rel=" in _one_line_exit_2(code, capsys)


def test_parity_out_that_is_a_file_is_exit_2_before_any_side_runs(tmp_path, capsys):
    (tmp_path / "report").write_text("")
    started = time.time()
    code = parity_main(["run", "--config", "yaml/parity/tiny_fp32.yaml", "--out", str(tmp_path / "report")])
    assert "is a file" in _one_line_exit_2(code, capsys) and time.time() - started < 10


def test_a_non_finite_ledger_value_is_refused(tmp_path, capsys):
    ledger = tmp_path / "ledger.jsonl"
    add = [
        "gap",
        "add",
        "--ledger",
        str(ledger),
        "--backend",
        "cpu",
        "--setting",
        "fp32",
        "--metric",
        "top1",
        "--seed",
        "0",
        "--value",
    ]
    assert "must be a finite number" in _one_line_exit_2(parity_main([*add, "nan"]), capsys)
    assert not ledger.exists()
    assert parity_main([*add, "68.5"]) == 0
    row = json.loads(ledger.read_text()) | {"value": float("inf")}
    with ledger.open("a") as f:
        f.write(json.dumps(row) + "\n")  # written by something else
    code = parity_main(["gap", "report", "--ledger", str(ledger), "--metric", "top1", "--baseline", "cpu:fp32"])
    assert "ledger.jsonl:2: value inf is not a finite number" in _one_line_exit_2(code, capsys)


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("")
    code = digpt_main(["pretrain", *CPU, f"run.out_dir={tmp_path / 'out'}"])
    assert "is a file, not a directory" in _one_line_exit_2(code, capsys)


@pytest.mark.multiprocess
def test_help_does_not_wait_for_torch():
    probe = "import sys, digpt_xla.cli, parity.__main__; print('torch' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", probe], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "model:\n  name: digpt_tiny\n  name: digpt_vit_base_patch16_224\n",
            "line 3, column 3: YAML syntax error (key 'name' appears twice",
        ),
        (
            "model:\n  name: digpt_tiny\nrun:\n  seed: 1\nmodel:\n  depth: 2\n",
            "line 5, column 1: YAML syntax error (key 'model' appears twice",
        ),
        (b"\xff\xfe\x00binary", "not a YAML text file"),
    ],
    ids=["a key twice", "a section twice", "binary"],
)
def test_a_config_that_yaml_would_read_wrongly_is_one_line(tmp_path, capsys, text, expected):
    # YAML keeps the last of two equal keys without a word (a second `name:` trained another model).
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code = digpt_main(["pretrain", "--config", str(path), "run.progress=false"])
    line = _one_line_exit_2(code, capsys)
    assert str(path) in line and expected in line, line


def test_an_image_folder_never_files_other_classes_or_special_files_under_a_class(tmp_path, caplog):
    root = image_folder(tmp_path, per_class=5)
    os.symlink("..", root / "2" / "up")  # up/0, up/1, up/2 ... would be filed under class 2
    os.mkfifo(root / "1" / "x.png")  # open() of a FIFO blocks until a writer comes: never
    os.symlink("/dev/zero", root / "0" / "zero.png")  # endless
    samples, classes = scan_image_folder(str(root))
    per_class = {c: sum(1 for _, label in samples if label == i) for c, i in classes.items()}
    assert per_class == {"0": 5, "1": 5, "2": 5}, per_class
    assert "leads back to" in caplog.text and "not a regular file" in caplog.text
    os.symlink(".", root / "all")  # a "class" that is the root itself: every image again, under a new label
    samples, classes = scan_image_folder(str(root))
    assert set(classes) == {"0", "1", "2"} and len(samples) == 15, classes
    os.symlink("loop", root / "loop")  # a link to itself at the root: one line, not an OSError traceback
    with pytest.raises(DataError, match=r"data.root: .*loop: Too many levels of symbolic links"):
        scan_image_folder(str(root))


@pytest.mark.parametrize("seed", ["-1", "100000000000000000000"])
def test_a_seed_no_generator_takes_is_one_line_at_load(tmp_path, capsys, seed):
    # -1 failed on XLA only, and 1e20 overflowed into a traceback, both after the run had started.
    code = digpt_main(["pretrain", *CPU, f"run.seed={seed}", f"run.out_dir={tmp_path}"])
    assert f"run.seed={seed}: a seed from 0 to 2**63 - 1" in _one_line_exit_2(code, capsys)


@pytest.mark.parametrize(("name", "make"), [("checkpoints", "file"), ("tb", "file"), ("metrics.jsonl", "dir")])
def test_a_run_directory_whose_parts_are_the_wrong_kind_is_refused_at_start(tmp_path, capsys, name, make):
    # Found before the first step, not by the final save after all the work.
    (tmp_path / name).mkdir() if make == "dir" else (tmp_path / name).write_text("")
    code = digpt_main(["pretrain", *CPU, f"run.out_dir={tmp_path}"])
    line = _one_line_exit_2(code, capsys)
    assert f"{tmp_path / name}: is a {'directory' if make == 'dir' else 'file'}" in line, line
    assert not (tmp_path / "lease.json").exists()  # the lease is given back


def test_results_that_could_not_be_written_are_refused_before_the_work(tmp_path, capsys):
    # A file where a folder must go (as root, permissions alone would not stop a write): probe and parity check
    # their output directory before minutes of features or sides, not after.
    (tmp_path / "file").write_text("")
    started = time.time()
    out = tmp_path / "file" / "report"
    code = parity_main(["run", "--config", "yaml/parity/tiny_fp32.yaml", "--out", str(out)])
    assert f"--out={out}: cannot be written" in _one_line_exit_2(code, capsys) and time.time() - started < 10
    code = digpt_main(["probe", "--config", "yaml/demo.yaml", f"run.out_dir={out}"])
    assert f"run.out_dir={out}: cannot be written" in _one_line_exit_2(code, capsys) and time.time() - started < 20


@pytest.mark.multiprocess
@pytest.mark.skipif(not HAS_XLA, reason="needs torch_xla")
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_pjrt_device_tpu_without_libtpu_is_one_line(tmp_path):
    # In a process of its own: torch_xla's runtime starts once per process.
    cmd = [PYTHON, "-m", "digpt_xla.cli", "pretrain", *CPU, "backend.name=xla", f"run.out_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(PJRT_DEVICE="TPU"), capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "PJRT_DEVICE=TPU: torch_xla's runtime did not start (libtpu not found)" in errors[0]
