"""Checkpoints on any fsspec filesystem, written so that a reader never sees a partial one.

Layout: ``<dir>/ckpt-<step>.pt`` (one file, unsharded runs) or ``<dir>/ckpt-<step>/`` (sharded runs: DCP's files
written by every rank plus ``meta.pt``), then a ``ckpt-<step>.done`` marker written after all the data. Object
stores have no atomic rename, so the marker is the commit: readers ignore checkpoints without one. On local disks
a single file is additionally written to a temporary name and renamed. A sharded checkpoint may be written in the
background; it is committed once the write has finished (at the next save, or at once when asked to wait). A
checkpoint whose parameters are not all finite is never committed; a committed one that cannot be read is set
aside (renamed ``*.corrupt``, never deleted) and the previous complete one is used.

Before its marker is written, a sharded checkpoint is checked for completeness: DCP's metadata must hold every
tensor the run has (each parameter and optimizer state tensor, every element of it covered by the saved chunks).
The marker then records each file's size and SHA-256, which every reader checks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

from ..daemon_pool import in_background
from .reader import (
    SHARDED_META,
    CheckpointError,
    check_shard_files,
    dcp_cause,
    dcp_reader,
    digest,
    error_summary,
    file_digest,
    read_checkpoint,
)

log = logging.getLogger(__name__)
_NAME = re.compile(r"ckpt-(\d+)(\.pt)?$")


class CheckpointManager:
    def __init__(self, directory: str, keep_last: int = 3) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(directory)
        self.directory = directory.rstrip("/")
        self.keep_last = keep_last
        self._pending: tuple[int, Future | None] | None = None  # a sharded write not yet committed

    def _path(self, step: int, suffix: str) -> str:
        return f"{self.root.rstrip('/')}/ckpt-{step:08d}{suffix}"

    def _url(self, step: int, suffix: str) -> str:
        return f"{self.directory}/ckpt-{step:08d}{suffix}"

    def url_of(self, step: int) -> str:
        """The sharded checkpoint directory of ``step`` (before it exists)."""
        return self._url(step, "")

    def url(self, step: int) -> str:
        """The checkpoint of ``step``: its directory when it is sharded, else its ``.pt`` file."""
        return self._url(step, "" if self.fs.isdir(self._path(step, "")) else ".pt")

    @staticmethod
    def _refuse_nonfinite(url: str, nonfinite: Collection[str]) -> None:
        bad = next(iter(nonfinite), None)
        if bad is not None:
            raise CheckpointError(f"refusing to commit {url}: parameter {bad!r} is not finite")

    def complete_steps(self) -> list[int]:
        """Steps with a committed checkpoint, oldest first."""
        if not self.fs.exists(self.root):
            return []
        names = {p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)}
        steps = set()
        for name in names:
            m = _NAME.match(name)
            if m and f"ckpt-{m.group(1)}.done" in names:
                steps.add(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> str | None:
        steps = self.complete_steps()
        return self.url(steps[-1]) if steps else None

    def save(self, state: dict[str, Any], step: int, parameters: Collection[str] = ()) -> str:
        """Write and commit ``state``; refused when one of the ``parameters`` in ``state["model"]`` (the trainable
        tensors: buffers such as the attention mask hold -inf by design) is not finite."""
        model = state["model"]
        finite = [isinstance(model.get(k), Tensor) and bool(torch.isfinite(model[k]).all()) for k in parameters]
        self._refuse_nonfinite(self._url(step, ".pt"), [k for k, ok in zip(parameters, finite, strict=True) if not ok])
        buffer = io.BytesIO()
        torch.save(state, buffer)
        final = self._path(step, ".pt")
        local = isinstance(self.fs, LocalFileSystem)
        tmp = self._path(step, ".pt.tmp") if local else final
        with self._writing(step, ".pt", leftovers=(tmp, final)):
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(tmp, buffer.getvalue())
            if local:
                self.fs.mv(tmp, final)
            self._commit(step, {f"ckpt-{step:08d}.pt": digest(buffer.getvalue())})
        return self.url(step)

    @contextlib.contextmanager
    def _writing(
        self, step: int, suffix: str, leftovers: Collection[str] = (), running: Collection[Future] = ()
    ) -> Iterator[None]:
        """A write that fails (a full disk, a file-size limit, a bucket that refuses it) becomes one CheckpointError
        naming the checkpoint; the ``leftovers`` of the uncommitted checkpoint are removed once the ``running``
        background writes into them have ended (readers ignore an uncommitted checkpoint, but a partial file of
        gigabytes would keep the disk full). Committed checkpoints are never touched."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            yield
        except (OSError, CheckpointException) as e:
            concurrent.futures.wait(running)
            if not self.fs.exists(self._path(step, ".done")):
                for path in leftovers:
                    with contextlib.suppress(OSError):  # another rank was first, or the store refuses this too
                        if self.fs.exists(path):
                            self.fs.rm(path, recursive=True)
            newest = self.latest()
            kept = f"the newest complete checkpoint, {newest}, is kept" if newest else "no earlier checkpoint exists"
            raise CheckpointError(
                f"could not write {self._url(step, suffix)} ({error_summary(dcp_cause(e))}); {kept}. Free space (or "
                "raise the limit) and continue with run.resume=auto"
            ) from None

    def _commit(self, step: int, files: dict[str, Any]) -> None:
        """Write the marker (the commit), listing every file of the checkpoint with its size and SHA-256."""
        self.fs.pipe_file(self._path(step, ".done"), json.dumps({"step": step, "files": files}, indent=1).encode())
        self._prune()

    def save_sharded(
        self,
        step: int,
        meta: dict[str, Any],
        write: Callable[[str], Future | None],
        is_main: bool,
        expected: Mapping[str, tuple[int, ...]],
        wait: bool = True,
        nonfinite: Collection[str] = (),
    ) -> str:
        """A sharded checkpoint: every rank calls this; ``write(url)`` writes the DCP part (returning a Future when
        it runs in the background) and the main rank writes ``meta`` and, once all is written and found complete
        (``expected``: every DCP key the checkpoint must hold, with its global shape), the marker. With ``wait``
        false an asynchronous write is committed by the next save or ``commit_pending``. Refused before anything is
        written when ``nonfinite`` names a parameter (found on the devices, where the shards are)."""
        path, url = self._path(step, ""), self._url(step, "")
        self._refuse_nonfinite(url, nonfinite)
        self.commit_pending()
        # DCP's write first: it fails on every rank together (DCP gathers each rank's outcome), so a failure of the
        # main rank's own file after it cannot leave another rank inside DCP's collectives.
        running: list[Future] = []
        with self._writing(step, "", leftovers=(path,), running=running):
            written = write(url)
            running += [written] if written is not None else []
            if is_main:
                self.fs.makedirs(path, exist_ok=True)
                buffer = io.BytesIO()
                torch.save(meta, buffer)
                self.fs.pipe_file(f"{path}/{SHARDED_META}", buffer.getvalue())

        def check() -> dict[str, Any] | None:
            if written is not None:
                written.result()
            if not is_main:
                return None
            check_sharded_complete(url, expected)
            return {
                f"ckpt-{step:08d}/{p.rsplit('/', 1)[-1]}": file_digest(f"{url}/{p.rsplit('/', 1)[-1]}")
                for p in self.fs.ls(path, detail=False)
            }

        # Checked and hashed in the background too when the write is: the step loop goes on meanwhile.
        self._pending = (step, _done(check()) if written is None else in_background(check, name="digpt-ckpt-commit"))
        if wait:
            self.commit_pending()
        return url

    def commit_pending(self) -> None:
        """Wait for a background checkpoint write and its check, then commit it (main rank). An incomplete
        checkpoint is never committed: CheckpointError names what is missing."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        with self._writing(step, "", leftovers=(self._path(step, ""),)):
            files = future.result() if future is not None else None
            if files is not None:
                self._commit(step, files)
        if files is not None:
            log.info("committed %s", self.url(step))

    def load_latest(self) -> tuple[str, dict[str, Any]] | None:
        """The newest committed checkpoint that can be read, as (url, state); None when there is none. Unreadable
        ones on the way are reported by name and renamed ``*.corrupt`` (the main rank's call)."""
        for step in reversed(self.complete_steps()):
            url = self.url(step)
            try:
                return url, read_checkpoint(url)
            except CheckpointError as e:
                log.warning("skipping a checkpoint that cannot be loaded: %s", e)
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        url = self.url(step)
        for suffix in (".done", ".pt", ""):  # uncommit first
            path = self._path(step, suffix)
            if self.fs.exists(path):
                with contextlib.suppress(FileNotFoundError):  # another rank was first
                    self.fs.mv(path, path + ".corrupt", recursive=True)
        log.warning("renamed %s to %s.corrupt (kept for inspection)", url, url)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for step in self.complete_steps()[: -self.keep_last]:
            self.fs.rm(self._path(step, ".done"))  # uncommit first: a crash here leaves no half checkpoint
            for suffix in (".pt", ""):
                if self.fs.exists(self._path(step, suffix)):
                    self.fs.rm(self._path(step, suffix), recursive=True)


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def check_sharded_complete(
    url: str, expected: Mapping[str, tuple[int, ...]], doing: str = "refusing to commit"
) -> None:
    """Refuse (to commit, or to resume from: ``doing``) a DCP checkpoint whose metadata lacks a tensor of
    ``expected``, has it with another shape, or whose saved chunks do not cover all of it (replicas of one chunk
    count once)."""
    metadata = dcp_reader(url).read_metadata()
    entries = metadata.state_dict_metadata
    try:  # each shard file where this process can see it (ranks on node-local disks write where others cannot)
        check_shard_files(url, metadata)
    except CheckpointError as e:
        raise CheckpointError(f"{doing} {url}: {e}; do all ranks write to one shared run.out_dir?") from None
    for key, shape in expected.items():
        meta = entries.get(key)
        if meta is None:
            held = sum(1 for k in expected if k in entries)
            raise CheckpointError(
                f"{doing} {url}: it lacks {key!r} (holds {held} of the run's {len(expected)} tensors)"
            )
        if tuple(meta.size) != tuple(shape):
            raise CheckpointError(f"{doing} {url}: {key!r} has shape {tuple(meta.size)}, the run's is {shape}")
        chunks = {(tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks}
        covered = sum(math.prod(sizes) for _, sizes in chunks)
        if covered != math.prod(shape):
            raise CheckpointError(f"{doing} {url}: {key!r} holds {covered} of its {math.prod(shape)} elements")
