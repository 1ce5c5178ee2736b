"""webdataset shards (``.jpg``/``.png`` + ``.cls``) on any fsspec filesystem: local, ``gs://`` (gcsfs), ``memory://``.

Each rank's batches are dealt round-robin to ``data.num_workers`` lanes (one per DataLoader worker), and each
lane reads its own stream of shards and yields whole batches. In resampled mode (the default, for training) a
lane draws shards with replacement from a seeded RNG, so every rank runs the same number of steps per epoch
however the shards are sized; otherwise ranks and lanes partition the shard list, and each pass over a lane's
share reads each of its samples once. A shuffle buffer mixes samples across shards before decoding.

Resume: the stream of every (rank, lane, epoch) is a function of the seed, so a restarted run replays the
current epoch's raw samples up to the consumed position without decoding them and continues with the next
unseen sample. This is exact for the same world size and ``data.num_workers``, except that each sample that was
skipped as unreadable earlier in the epoch shifts that lane's stream by one sample (so the guarantee is "within
one shuffle buffer" in all cases).
"""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import json
import os
import posixpath
import random
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..daemon_pool import DaemonPool
from ..filesystems import protocol_problem
from .errors import DataError, SkipCounter, log
from .sampler import sample_seed
from .transforms import decode_image, seeded

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"
MAX_UNREADABLE_IN_A_ROW = 1000
_POOLS: dict[int, DaemonPool] = {}


def _pool() -> DaemonPool:
    # One per process: a pool inherited through fork (DataLoader workers) has no threads and would never run.
    pid = os.getpid()
    if pid not in _POOLS:
        _POOLS[pid] = DaemonPool(4, "digpt-shard-io")
    return _POOLS[pid]


def expand_urls(spec: str) -> list[str]:
    """Brace-expanded shard URLs; several specs may be joined with ``::`` (webdataset's convention)."""
    urls = [url for part in spec.split("::") if part.strip() for url in braceexpand(part.strip())]
    if not urls:
        raise DataError(f"data.urls: {spec!r} names no shard")
    return urls


def _timed(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    future = _pool().submit(fn)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise _stalled(what, timeout) from None


def _stalled(what: str, timeout: float) -> DataError:
    return DataError(f"{what}: no answer in {timeout:g}s (data.read_timeout); the storage is stalled")


def check_shards_exist(urls: list[str], timeout: float) -> None:
    """Fail at once, naming them, if shards are missing: a wrong brace range should not surface hours later."""

    def exists(url: str) -> bool:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)

    # In parallel: a thousand gs:// shards checked one by one would add a minute to every rank's start.
    pool = DaemonPool(32, "digpt-shard-check")  # daemon threads: a stalled check never keeps the process alive
    futures = {u: pool.submit(exists, u) for u in urls}
    found = []
    for url, future in futures.items():
        try:
            found.append(future.result(timeout=timeout))
        except concurrent.futures.TimeoutError:
            for pending in futures.values():
                pending.cancel()
            raise _stalled(url, timeout) from None
    missing = [u for u, ok in zip(urls, found, strict=True) if not ok]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"data.urls: {len(missing)} of {len(urls)} shards do not exist: {shown}")


class _TimeoutRaw(io.RawIOBase):
    """A file whose every read must finish within ``timeout`` seconds, else DataError naming the URL."""

    def __init__(self, f: Any, url: str, timeout: float) -> None:
        self.f, self.url, self.timeout = f, url, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = _timed(lambda: self.f.read(len(buffer)), self.timeout, f"{self.url}: read")
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def open_shard(url: str, timeout: float) -> io.BufferedReader:
    def _open() -> Any:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.open(path, "rb")

    f = _timed(_open, timeout, f"{url}: open")
    return io.BufferedReader(_TimeoutRaw(f, url, timeout), buffer_size=1 << 20)


def find_manifest(directory: str, timeout: float) -> dict[str, Any] | None:
    """``directory/manifest.json`` (written by tools/make_shards.py beside its shards), if there is one."""
    url = posixpath.join(directory.rstrip("/"), MANIFEST)

    def read() -> str | None:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            return f.read()

    text = _timed(read, timeout, f"{url}: read")
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{url}: not valid JSON ({e})") from None
    return check_manifest(manifest, url)


def check_manifest(manifest: Any, url: str) -> dict[str, Any]:
    """A manifest as tools/make_shards.py writes it: ``shards`` maps shard file names to sample counts."""
    if not isinstance(manifest, dict):
        raise DataError(f"{url}: a JSON {type(manifest).__name__}, not a manifest object")
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise DataError(
            f"{url}: 'shards' must map shard file names to sample counts, e.g. {{\"shard-000000.tar\": 1000}}"
        )
    bad = next((k for k, v in shards.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
    if bad is not None:
        raise DataError(f"{url}: shards[{bad!r}] = {shards[bad]!r} is not a sample count")
    classes = manifest.get("num_classes")
    if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 1):
        raise DataError(f"{url}: num_classes = {classes!r} is not a positive whole number")
    return manifest


def check_protocols(urls: list[str]) -> None:
    """Every URL's filesystem can be opened here (one line naming the first URL of a protocol, not ImportError)."""
    first_of: dict[str, str] = {}  # protocol -> the first URL that uses it
    for url in urls:
        first_of.setdefault(fsspec.core.split_protocol(url)[0] or "file", url)
    for first in sorted(first_of.values()):
        problem = protocol_problem(first)
        if problem:
            raise DataError(f"data.urls: {first}: {problem}")


def raw_samples(url: str, timeout: float, skips: SkipCounter, expected: int | None = None) -> Iterator[dict]:
    """Undecoded samples (``__key__``, ``__url__`` and one bytes entry per extension) of one shard.

    A missing shard, an unreadable tar or a tar that ends early is logged and counted, and the stream goes on.
    With ``expected`` (the manifest's count) the samples lost to a damaged tar are counted exactly; without it
    the damage counts as one."""
    try:
        stream = open_shard(url, timeout)
    except FileNotFoundError:
        skips.count += expected or 1
        log.warning("%s: shard missing; %s samples skipped", url, expected or "its")
        return
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        if isinstance(exn, DataError):
            return False  # a stalled read stops the run with its own message
        errors.append(exn)
        return True

    delivered = 0
    try:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler)):
            delivered += 1
            yield sample
    finally:
        stream.close()
    if errors:
        lost = (expected - delivered) if expected is not None else 1
        skips.count += max(lost, 0)
        log.warning("%s: damaged tar after sample %d (%s); %d samples skipped", url, delivered, errors[0], lost)
    elif expected is not None and delivered < expected:
        skips.count += expected - delivered
        log.warning("%s: %d samples, the manifest says %d; %d skipped", url, delivered, expected, expected - delivered)


def decode_sample(raw: dict, transform: Callable, seed: int, num_classes: int | None, skips: SkipCounter):
    """``{"images", "labels"}`` of one raw sample, or None (logged and counted) if it cannot be used."""
    where, key = raw.get("__url__", "?"), raw.get("__key__", "?")
    data = next((raw[e] for e in IMAGE_EXTENSIONS if e in raw), None)
    if data is None or "cls" not in raw:
        skips.skip(where, key, f"incomplete sample (has {sorted(k for k in raw if not k.startswith('__'))})")
        return None
    try:
        label = int(raw["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError) as e:
        skips.skip(where, key, f"unreadable .cls ({e})")
        return None
    if label < 0 or (num_classes is not None and label >= num_classes):
        skips.skip(where, key, f"label {label} out of range [0, {num_classes})")
        return None
    try:
        image = decode_image(data)
    except Exception as e:  # PIL raises many types for bad images
        skips.skip(where, key, f"cannot decode image ({type(e).__name__}: {e})")
        return None
    return {"images": seeded(transform, image, seed), "labels": torch.tensor(label)}


class WebDatasetSource:
    """The shard set and how to read it; ``batches(...)`` gives one rank's IterableDataset of batches."""

    def __init__(
        self,
        urls: str,
        transform: Callable,
        *,
        resampled: bool = True,
        shuffle_buffer: int = 5000,
        samples_per_epoch: int | None = None,
        num_classes: int | None = None,
        read_timeout: float = 120.0,
        check: bool = True,
    ) -> None:
        self.urls = expand_urls(urls)
        check_protocols(self.urls)
        self.transform, self.resampled, self.shuffle_buffer = transform, resampled, shuffle_buffer
        self.read_timeout = read_timeout
        if check:
            check_shards_exist(self.urls, read_timeout)
        manifest = find_manifest(posixpath.dirname(self.urls[0]), read_timeout)
        counts = (manifest or {}).get("shards", {})
        self.expected = {u: counts.get(posixpath.basename(u)) for u in self.urls}
        self.num_classes = num_classes or ((manifest or {}).get("num_classes"))
        if samples_per_epoch is None:
            if manifest is None or any(c is None for c in self.expected.values()):
                raise DataError(
                    f"data.samples_per_epoch is not set and no manifest.json beside {self.urls[0]} gives the "
                    "shards' sample counts; set it (ImageNet-1K train: 1281167)"
                )
            samples_per_epoch = sum(self.expected.values())
        self.samples_per_epoch = samples_per_epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def shard_share(self, rank: int, world: int, lane: int, lanes: int) -> list[str]:
        """The shards one (rank, lane) reads in non-resampled mode: a partition of the shard list."""
        share = self.urls[rank::world][lane::lanes]
        if not share:
            raise DataError(
                f"{len(self.urls)} shards cannot be split over {world} ranks x {lanes} workers (data.num_workers) with "
                "data.resampled=false; use data.resampled=true, fewer workers or more shards"
            )
        return share

    def raw_stream(self, seed: int, epoch: int, rank: int, world: int, lane: int, lanes: int, skips: SkipCounter):
        """Shuffled undecoded samples of one (rank, lane, epoch), endless.

        Resampled: shards drawn with replacement, one shuffle buffer over the whole stream. Otherwise: passes over
        this lane's share of the shards, each in a new order and shuffled within itself, so a pass holds every
        sample of the share exactly once."""
        stream_seed = zlib.crc32(f"{seed}/{epoch}/{rank}/{lane}".encode())
        rng = random.Random(stream_seed)
        empty_in_a_row, limit = 0, max(3 * len(self.urls), 20)

        def read(shards) -> Iterator[dict]:
            nonlocal empty_in_a_row
            for url in shards:
                got = 0
                for sample in raw_samples(url, self.read_timeout, skips, self.expected.get(url)):
                    got += 1
                    yield sample
                empty_in_a_row = 0 if got else empty_in_a_row + 1
                if empty_in_a_row >= limit:
                    raise DataError(f"no readable sample in {limit} shard reads in a row from {self.urls[0]} ...")

        def shuffled(samples: Iterator[dict], salt: int) -> Iterator[dict]:
            if self.shuffle_buffer <= 1:
                return samples
            initial = min(self.shuffle_buffer, 1000)
            return _shuffle(samples, self.shuffle_buffer, initial, rng=random.Random(stream_seed + salt))

        if self.resampled:
            yield from shuffled(read(rng.choice(self.urls) for _ in itertools.count()), 1)
            return
        share = self.shard_share(rank, world, lane, lanes)
        for n in itertools.count():
            yield from shuffled(read(rng.sample(share, len(share))), n + 1)

    def decoded(self, seed: int, epoch: int, rank: int, world: int, lane: int, lanes: int, skip_raw: int = 0):
        """Decoded samples of one (rank, lane, epoch), after ``skip_raw`` raw samples (a resume)."""
        skips = SkipCounter()
        raw = self.raw_stream(seed, epoch, rank, world, lane, lanes, skips)
        bad_in_a_row = 0
        for position, sample in enumerate(raw):
            if position < skip_raw:
                skips.take()  # counted before the interruption
                continue
            seed_i = sample_seed(seed + 7 * rank + 13 * lane, epoch, position)
            out = decode_sample(sample, self.transform, seed_i, self.num_classes, skips)
            bad_in_a_row = 0 if out is not None else bad_in_a_row + 1
            if bad_in_a_row >= MAX_UNREADABLE_IN_A_ROW:
                raise DataError(f"{bad_in_a_row} unreadable samples in a row from {self.urls[0]} ...: no usable data")
            if out is not None:
                out["index"] = torch.tensor(zlib.crc32(f"{sample['__url__']}/{sample['__key__']}".encode()))
                out["skipped"] = torch.tensor(skips.take())
                yield out

    def batches(
        self, batch_size: int, rank: int, world: int, seed: int, start_batch: int = 0, workers: int = 0
    ) -> _RankBatches:
        if not self.resampled:  # every worker of every rank needs shards of its own: found now, not at step 7
            self.shard_share(world - 1, world, max(workers, 1) - 1, max(workers, 1))
        return _RankBatches(self, batch_size, rank, world, seed, start_batch)


class _RankBatches(IterableDataset):
    """One rank's endless batches. Batch g of the rank belongs to lane ``g % workers``: each lane is a stream of its
    own, a function of (seed, epoch, rank, lane) only. DataLoader hands batches out round-robin from its first
    worker, so worker w serves the lane of batch ``start_batch + w``; a resumed loader therefore continues every
    lane where it stopped."""

    def __init__(self, source: WebDatasetSource, batch_size: int, rank: int, world: int, seed: int, start_batch: int):
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world
        self.seed, self.start_batch = seed, start_batch
        self.batches_per_epoch = len(source) // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(source)} samples per epoch is less than one global batch of {batch_size * world}")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        w, lanes = (info.id, info.num_workers) if info is not None else (0, 1)
        bpe, g = self.batches_per_epoch, self.start_batch + w
        lane = g % lanes
        epoch, stream = None, None
        while True:
            e = g // bpe
            if e != epoch:
                first = e * bpe + (lane - e * bpe) % lanes  # the lane's first batch of epoch e
                epoch = e
                stream = self.source.decoded(
                    self.seed,
                    e,
                    self.rank,
                    self.world,
                    lane,
                    lanes,
                    skip_raw=len(range(first, g, lanes)) * self.batch_size,
                )
            assert stream is not None  # set at the first batch (epoch starts as None)
            batch = default_collate(list(itertools.islice(stream, self.batch_size)))
            batch["skipped"] = batch["skipped"].sum()
            yield batch
            g += lanes
