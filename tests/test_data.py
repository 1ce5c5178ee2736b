"""The data pipeline on real files made here: shards from make_shards, ImageFolder trees, corrupted and truncated
inputs, a stalled filesystem, rank x worker splitting, resume positions."""

import io
import itertools
import logging
import os
import subprocess
import time

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from conftest import PYTHON, REPO, needs_xla, subprocess_env
from digpt_xla.checkpoint.reader import read_checkpoint
from digpt_xla.config import load_config
from digpt_xla.data import (
    DataError,
    ImageFolderDataset,
    WebDatasetSource,
    build_train_dataset,
    build_train_loader,
    pretrain_transform,
    timm_transform,
)
from digpt_xla.data.errors import SkipCounter
from digpt_xla.data.shard_io import Sample, check_shards, digits_samples, write_shards
from digpt_xla.data.shards import raw_samples
from digpt_xla.data.transforms import decode_image, seeded
from digpt_xla.engine import Pretrainer
from digpt_xla.engine.metrics import read_metrics

IMG = 32
TO_TENSOR = pretrain_transform(IMG, min_scale=1.0, hflip=False)  # a deterministic resize + normalise


def digits(n: int) -> list[Sample]:
    samples, _, _ = digits_samples(IMG)
    return list(itertools.islice(samples, n))


def make_set(out: str, samples: list[Sample], per_shard: int) -> dict:
    classes = {str(d): d for d in range(10)}
    return write_shards(samples, len(samples), out, per_shard, classes, "test", progress=False)


def source(spec: str, **kw) -> WebDatasetSource:
    kw = {"resampled": False, "shuffle_buffer": 0} | kw
    return WebDatasetSource(spec, lambda im: TO_TENSOR(im), **kw)


def pass_of(src: WebDatasetSource, n: int, rank=0, world=1, worker=0, workers=1) -> list[dict]:
    return list(itertools.islice(src.decoded(0, 0, rank, world, worker, workers), n))


# ---------------------------------------------------------------- writing and reading shards


@pytest.mark.parametrize("fs_root", ["local", "memory"])
def test_shards_read_back_with_images_labels_and_counts(tmp_path, fs_root):
    out = str(tmp_path / "shards") if fs_root == "local" else f"memory://digpt-test-{os.getpid()}/shards"
    originals = digits(50)
    manifest = make_set(out, originals, per_shard=20)
    assert manifest["shards"] == {"shard-000000.tar": 20, "shard-000001.tar": 20, "shard-000002.tar": 10}
    assert manifest["num_samples"] == 50 and manifest["num_classes"] == 10
    src = source(f"{out}/shard-{{000000..000002}}.tar")
    assert len(src) == 50, "samples per epoch come from the manifest"
    got = {}
    for url in src.urls:
        for raw in raw_samples(url, 10.0, SkipCounter()):
            got[raw["__key__"]] = raw
    assert len(got) == 50
    for s in originals:
        raw = got[s.key]
        assert raw["jpg"] == s.data and int(raw["cls"]) == s.label
    decoded = pass_of(src, 50)
    expected = {s.key: s.label for s in originals}
    assert sorted(int(d["labels"]) for d in decoded) == sorted(expected.values())
    first = originals[0]
    ref = TO_TENSOR(decode_image(first.data))
    assert any(torch.equal(d["images"], ref) for d in decoded), "the decoded pixels are the written image's"
    assert check_shards(out, progress=False).ok


@pytest.mark.multiprocess
def test_make_shards_cli_writes_and_checks(tmp_path):
    out = tmp_path / "digits"
    run = [PYTHON, "tools/make_shards.py", "digits", str(out), "--per-shard", "500", "--no-progress"]
    proc = subprocess.run(run, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1797 samples in 4 shards" in proc.stdout and "shard-{000000..000003}.tar" in proc.stdout
    check = [PYTHON, "tools/make_shards.py", "check", str(out), "--no-progress"]
    proc = subprocess.run(check, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1797 readable, 0 bad: OK" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------- bad input


def damaged_set(tmp_path) -> tuple[str, list[Sample]]:
    samples = digits(60)
    samples[3] = Sample(samples[3].key, "jpg", b"\xff\xd8 this is not a jpeg", samples[3].label)
    out = str(tmp_path / "damaged")
    make_set(out, samples, per_shard=20)
    shard = tmp_path / "damaged" / "shard-000002.tar"
    data = shard.read_bytes()
    last_image = data.rfind(samples[-1].data[:64])  # inside the last sample's image data
    shard.write_bytes(data[: last_image + 100])
    return out, samples


def test_corrupt_image_and_truncated_tar_are_skipped_counted_and_named(tmp_path, caplog):
    out, samples = damaged_set(tmp_path)
    src = source(f"{out}/shard-{{000000..000002}}.tar")
    caplog.set_level(logging.WARNING, logger="digpt_xla.data")
    stream = src.decoded(0, 0, 0, 1, 0, 1)
    first_pass = list(itertools.islice(stream, 58))  # 60 written, 2 unusable
    keys = {int(d["index"]) for d in first_pass}
    assert len(keys) == 58
    skipped = sum(int(d["skipped"]) for d in first_pass) + int(next(stream)["skipped"])
    assert skipped == 2, "one undecodable image + one sample lost to the truncated tar, counted exactly"
    text = caplog.text
    assert "shard-000000.tar: sample 00000003 skipped: cannot decode image" in text.replace(out + "/", "")
    assert "shard-000002.tar: damaged tar" in text
    report = check_shards(out, progress=False)
    assert not report.ok and report.readable == 58
    assert any(key == "00000003" for _, key, _ in report.bad)


def test_training_continues_over_bad_samples_and_logs_the_count(tmp_path):
    out, _ = damaged_set(tmp_path)
    cfg = load_config(
        REPO / "yaml/demo.yaml",
        [
            "backend.name=cpu",
            "data.source=webdataset",
            f"data.urls={out}/shard-{{000000..000002}}.tar",
            "data.batch_size=8",
            "data.shuffle_buffer=0",
            "data.resampled=false",
            "schedule.max_steps=14",
            "run.log_every=14",
            f"run.out_dir={tmp_path / 'run'}",
            "run.knn_eval=false",
            "run.progress=false",
        ],
    )
    result = Pretrainer(cfg).train()
    assert result.step == 14
    (record,) = read_metrics(str(tmp_path / "run"))
    assert record["data_skipped"] >= 2, "112 samples read two passes over the damaged set"
    assert read_checkpoint(result.checkpoint)["data"]["skipped_samples"] == record["data_skipped"]


def test_missing_shard_and_empty_folder_give_clear_errors(tmp_path):
    out = str(tmp_path / "s")
    make_set(out, digits(20), per_shard=10)
    with pytest.raises(DataError, match=r"1 of 3 shards do not exist: .*shard-000002\.tar"):
        source(f"{out}/shard-{{000000..000002}}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders under"):
        ImageFolderDataset(str(tmp_path / "empty"), TO_TENSOR)
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(str(tmp_path / "hollow"), TO_TENSOR)
    with pytest.raises(DataError, match="is not a directory"):
        ImageFolderDataset(str(tmp_path / "nowhere"), TO_TENSOR)


def test_unreadable_source_fails_instead_of_spinning(tmp_path):
    bad = [Sample(f"{i:08d}", "jpg", b"garbage", i % 10) for i in range(30)]
    out = str(tmp_path / "bad")
    make_set(out, bad, per_shard=10)
    src = source(f"{out}/shard-{{000000..000002}}.tar", resampled=True)
    logging.getLogger("digpt_xla.data").setLevel(logging.ERROR)
    try:
        with pytest.raises(DataError, match="unreadable samples in a row"):
            next(src.decoded(0, 0, 0, 1, 0, 1))
    finally:
        logging.getLogger("digpt_xla.data").setLevel(logging.NOTSET)


class _StalledFS(MemoryFileSystem):
    """memory:// whose reads hang, like a remote store that stopped answering."""

    protocol = "stalledmem"

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(path.replace("stalledmem://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" in mode:
            f.read = lambda *a: time.sleep(3) or b""
        return f


def test_stalled_read_times_out_with_a_clear_message():
    fsspec.register_implementation("stalledmem", _StalledFS, clobber=True)
    out = f"memory://digpt-stall-{os.getpid()}"
    make_set(out, digits(10), per_shard=10)
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"stalledmem://.*: read: no answer in 0.5s \(data.read_timeout\)"):
        source(f"stalledmem://digpt-stall-{os.getpid()}/shard-000000.tar", read_timeout=0.5, samples_per_epoch=10)
    assert time.perf_counter() - t < 2.5


def test_out_of_range_label_is_skipped(tmp_path, caplog):
    samples = digits(10)
    samples[2] = Sample(samples[2].key, "jpg", samples[2].data, 12)
    out = str(tmp_path / "labels")
    make_set(out, samples, per_shard=10)
    src = source(f"{out}/shard-000000.tar", num_classes=10)
    caplog.set_level(logging.WARNING, logger="digpt_xla.data")
    got = pass_of(src, 9)
    assert all(0 <= int(d["labels"]) < 10 for d in got)
    assert "sample 00000002 skipped: label 12 out of range [0, 10)" in caplog.text


def test_imagefolder_replaces_an_unreadable_file_and_counts_it(tmp_path, caplog):
    root = image_folder(tmp_path, per_class=4)
    (root / "1" / "broken.png").write_bytes(b"\x89PNG broken")
    ds = ImageFolderDataset(str(root), TO_TENSOR)
    broken = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png"))
    caplog.set_level(logging.WARNING, logger="digpt_xla.data")
    item = ds[(broken, 0)]
    assert int(item["skipped"]) == 1 and int(item["index"]) == (broken + 1) % len(ds)
    assert "broken.png" in caplog.text


# ---------------------------------------------------------------- splitting, resampling, resume


def test_rank_worker_split_reads_every_sample_once_per_epoch(tmp_path):
    out = str(tmp_path / "split")
    sizes = [7, 13, 10, 9, 11, 10]  # uneven shards
    samples = digits(sum(sizes))
    offsets = list(itertools.accumulate(sizes, initial=0))
    for i, n in enumerate(sizes):
        make_set(f"{out}/part{i}", samples[offsets[i] : offsets[i] + n], per_shard=n)
        os.replace(f"{out}/part{i}/shard-000000.tar", f"{out}/shard-{i:06d}.tar")
    src = source(f"{out}/shard-{{000000..000005}}.tar", samples_per_epoch=len(samples), shuffle_buffer=8)
    seen = []
    world, workers = 2, 3
    for rank in range(world):
        for worker in range(workers):
            share = src.shard_share(rank, world, worker, workers)
            n = sum(sizes[int(u[-10:-4])] for u in share)
            seen += [int(d["index"]) for d in pass_of(src, n, rank, world, worker, workers)]
    assert len(seen) == len(samples) == len(set(seen)), "every sample exactly once across 2 ranks x 3 workers"
    with pytest.raises(DataError, match="cannot be split over 4 ranks x 2 workers"):
        src.shard_share(3, 4, 1, 2)


def test_resampled_mode_gives_every_rank_the_same_number_of_full_batches(tmp_path):
    out = str(tmp_path / "uneven")
    make_set(out, digits(67), per_shard=30)  # 30, 30, 7
    src = source(f"{out}/shard-{{000000..000002}}.tar", resampled=True, shuffle_buffer=16)
    counts = []
    for rank in range(3):
        batches = src.batches(batch_size=4, rank=rank, world=3, seed=0)
        counts.append(batches.batches_per_epoch)
        got = list(itertools.islice(iter(batches), 2 * batches.batches_per_epoch))  # two epochs
        assert all(b["images"].shape == (4, 3, IMG, IMG) for b in got)
    assert counts == [5, 5, 5]  # 67 // (4 x 3)


def test_webdataset_resume_continues_with_the_next_unseen_batches(tmp_path):
    out = str(tmp_path / "resume")
    make_set(out, digits(80), per_shard=20)
    src = source(f"{out}/shard-{{000000..000003}}.tar", resampled=True, shuffle_buffer=16)

    def indices(start: int, n: int) -> list[list[int]]:
        loader = build_train_loader(src, 4, 0, 1, seed=3, start_batch=start, num_workers=2)
        return [b["index"].tolist() for b in itertools.islice(loader, n)]

    full = indices(0, 30)  # 20 batches per epoch: the resume crosses an epoch boundary
    assert indices(13, 17) == full[13:]


def image_folder(tmp_path, per_class: int):
    root = tmp_path / "folder"
    samples, _, _ = digits_samples(IMG)
    counts = {}
    for s in samples:
        if counts.get(s.label, 0) < per_class and s.label < 3:
            (root / str(s.label)).mkdir(parents=True, exist_ok=True)
            Image.open(io.BytesIO(s.data)).save(root / str(s.label) / f"{s.key}.png")
            counts[s.label] = counts.get(s.label, 0) + 1
    return root


@pytest.mark.parametrize("kind", ["imagefolder", "digits"])
def test_map_style_resume_is_exact(tmp_path, kind):
    overrides = (
        ["data.source=digits"]
        if kind == "digits"
        else [
            "data.source=imagefolder",
            f"data.root={image_folder(tmp_path, per_class=10)}",
        ]
    )
    cfg = load_config(None, overrides).data
    ds = build_train_dataset(cfg, IMG)

    def batches(start: int, n: int) -> list[tuple[list[int], torch.Tensor]]:
        loader = build_train_loader(ds, 4, 0, 1, seed=1, start_batch=start, num_workers=0)
        return [(b["index"].tolist(), b["images"]) for b in itertools.islice(loader, n)]

    full, resumed = batches(0, 12), batches(5, 7)  # imagefolder: 30 images = 7 batches per epoch
    for (i_full, x_full), (i_res, x_res) in zip(full[5:], resumed, strict=True):
        assert i_full == i_res and torch.equal(x_full, x_res), "same samples, same augmentation"


def test_transforms_release_crop_and_timm(tmp_path):
    image = Image.new("RGB", (300, 200), (120, 30, 200))
    t = pretrain_transform(224)
    a, b = seeded(t, image, 5), seeded(t, image, 5)
    assert a.shape == (3, 224, 224) and torch.equal(a, b)
    crop = [s for s in t.transforms if type(s).__name__ == "RandomResizedCrop"][0]
    assert crop.scale == (0.2, 1.0) and crop.interpolation.value == "bicubic"
    assert timm_transform(224, training=True)(image).shape == (3, 224, 224)
    assert timm_transform(224, training=False)(image).shape == (3, 224, 224)


@pytest.mark.slow
@needs_xla
def test_skip_counts_follow_trained_batches_not_the_device_loaders_read_ahead(tmp_path):
    # MpDeviceLoader reads batches ahead of the step: a bad image in a batch not yet trained on must not count yet.
    root = image_folder(tmp_path, per_class=8)
    broken = sorted(root.rglob("*.png"))[5]
    broken.write_bytes(b"not a png")
    counts = {}
    for backend in ("cpu", "xla"):
        cfg = load_config(
            REPO / "yaml/demo.yaml",
            [
                f"backend.name={backend}",
                "data.source=imagefolder",
                f"data.root={root}",
                "data.batch_size=4",
                "schedule.max_steps=8",
                "run.log_every=1",
                "run.progress=false",
                "run.knn_eval=false",
                "model.depth=1",
                f"run.out_dir={tmp_path / backend}",
            ],
        )
        Pretrainer(cfg).train()
        counts[backend] = [r["data_skipped"] for r in read_metrics(str(tmp_path / backend))]
    assert counts["xla"] == counts["cpu"]
    assert 1 <= counts["cpu"][-1] <= 2, "24 images, 32 trained on: the bad one read once or twice"
