"""Writing and checking shard sets: ``tools/make_shards.py`` is the command line over these."""

from __future__ import annotations

import io
import json
import os
import posixpath
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from .errors import DataError, SkipCounter
from .imagefolder import scan_image_folder
from .shards import MANIFEST, decode_sample, expand_urls, find_manifest, raw_samples


@dataclass
class Sample:
    key: str
    ext: str  # "jpg" | "png" | ...
    data: bytes
    label: int


def image_folder_samples(root: str, seed: int = 0) -> tuple[Iterator[Sample], int, dict[str, int]]:
    """Every image of an ImageNet-layout folder, read lazily and stored as is (no re-encoding), in a seeded random
    order (shards of class-sorted folders would otherwise each hold one class); with the count and class map."""
    files, class_to_idx = scan_image_folder(root)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()

    def load(i: int) -> Sample:
        path, label = files[i]
        ext = os.path.splitext(path)[1].lower().lstrip(".").replace("jpeg", "jpg")
        with open(path, "rb") as f:
            return Sample(f"{i:08d}", ext, f.read(), label)

    return (load(i) for i in order), len(files), class_to_idx


def digits_samples(img_size: int = 32, quality: int = 95) -> tuple[Iterator[Sample], int, dict[str, int]]:
    """scikit-learn's digits as JPEG files at ``img_size`` (RGB), labels 0..9."""
    from .digits import load_digits_images

    images, labels = load_digits_images(img_size)
    samples = []
    for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        buf = io.BytesIO()
        array = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(buf, format="JPEG", quality=quality)
        samples.append(Sample(f"{i:08d}", "jpg", buf.getvalue(), label))
    return iter(samples), len(samples), {str(d): d for d in range(10)}


def write_shards(
    samples: Iterable[Sample],
    total: int,
    out: str,
    per_shard: int,
    class_to_idx: dict[str, int],
    source: str,
    prefix: str = "shard",
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``{out}/{prefix}-NNNNNN.tar`` shards (local directory or any fsspec URL) and ``{out}/manifest.json``.

    Each shard is written to a temporary name and renamed when complete, and the manifest comes last, so an
    interrupted run never leaves a shard set that looks whole."""
    if per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    counts: dict[str, int] = {}
    bar = tqdm(total=total, unit="img", desc=f"shards -> {out}", disable=not progress)
    it: Iterator[Sample] = iter(samples)
    index = 0
    while True:
        chunk = [s for _, s in zip(range(per_shard), it, strict=False)]
        if not chunk:
            break
        name = f"{prefix}-{index:06d}.tar"
        tmp = posixpath.join(root, f".{name}.tmp")
        with fs.open(tmp, "wb") as f, TarWriter(f) as writer:
            for s in chunk:
                writer.write({"__key__": s.key, s.ext: s.data, "cls": str(s.label).encode()})
        fs.mv(tmp, posixpath.join(root, name))
        counts[name] = len(chunk)
        bar.update(len(chunk))
        index += 1
    bar.close()
    if not counts:
        raise DataError(f"{source}: no samples to write")
    manifest = {
        "source": source,
        "num_samples": sum(counts.values()),
        "num_classes": len(class_to_idx),
        "classes": class_to_idx,
        "per_shard": per_shard,
        "shards": counts,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with fs.open(posixpath.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def shard_spec(out: str, manifest: dict[str, Any]) -> str:
    """The brace URL of a manifest's shards: ``{out}/shard-{000000..000009}.tar``."""
    names = sorted(manifest["shards"])
    prefix = names[0].rsplit("-", 1)[0]
    last = names[-1].rsplit("-", 1)[1].removesuffix(".tar")
    return posixpath.join(out.rstrip("/"), f"{prefix}-{{{'0' * len(last)}..{last}}}.tar")


@dataclass
class CheckReport:
    shards: int = 0
    samples: int = 0
    readable: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, reason)
    count_mismatch: dict[str, tuple[int, int]] = field(default_factory=dict)  # shard: (found, manifest)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.count_mismatch


def check_shards(spec: str, timeout: float = 120.0, progress: bool = True) -> CheckReport:
    """Re-read every shard of ``spec`` (brace URLs, or a directory holding a manifest), decode every sample and
    compare the counts with the manifest."""
    fs, path = fsspec.core.url_to_fs(spec)
    manifest = None
    if "{" not in spec and fs.isdir(path):
        manifest = find_manifest(spec, timeout)
        if manifest is None:
            raise DataError(f"{spec}: a directory without {MANIFEST}; pass the shard URLs instead")
        spec = shard_spec(spec, manifest)
    urls = expand_urls(spec)
    if manifest is None:
        manifest = find_manifest(posixpath.dirname(urls[0]), timeout)
    expected = (manifest or {}).get("shards", {})
    num_classes = (manifest or {}).get("num_classes")
    report = CheckReport()
    for url in tqdm(urls, unit="shard", desc="check", disable=not progress):
        skips = SkipCounter(record=True)
        name = posixpath.basename(url)
        found = 0
        for raw in raw_samples(url, timeout, skips, expected.get(name)):
            found += 1
            if decode_sample(raw, lambda im: im, 0, num_classes, skips) is not None:
                report.readable += 1
        report.shards += 1
        report.samples += found
        report.bad += skips.events or []
        if name in expected and expected[name] != found:
            report.count_mismatch[name] = (found, expected[name])
    return report
