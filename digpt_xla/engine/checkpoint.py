"""Checkpoints on any fsspec filesystem, written so that a reader never sees a partial one.

Layout: ``<dir>/ckpt-<step>.pt`` (one file, unsharded runs) or ``<dir>/ckpt-<step>/`` (sharded runs: DCP's files
written by every rank plus ``meta.pt``), then a ``ckpt-<step>.done`` marker written after all the data. Object
stores have no atomic rename, so the marker is the commit: readers ignore checkpoints without one. On local disks
a single file is additionally written to a temporary name and renamed. A sharded checkpoint may be written in the
background; it is committed once the write has finished (at the next save, or at once when asked to wait). A
checkpoint whose parameters are not all finite is never committed; a committed one that cannot be read is set
aside (renamed ``*.corrupt``, never deleted) and the previous complete one is used.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable, Collection
from concurrent.futures import Future
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

from ..checkpoint_io import SHARDED_META, CheckpointError, read_checkpoint

log = logging.getLogger(__name__)
_NAME = re.compile(r"ckpt-(\d+)(\.pt)?$")


class CheckpointManager:
    def __init__(self, directory: str, keep_last: int = 3) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(directory)
        self.directory = directory.rstrip("/")
        self.keep_last = keep_last
        self._pending: tuple[int, Future | None, bool] | None = None  # a sharded write not yet committed

    def _path(self, step: int, suffix: str) -> str:
        return f"{self.root.rstrip('/')}/ckpt-{step:08d}{suffix}"

    def _url(self, step: int, suffix: str) -> str:
        return f"{self.directory}/ckpt-{step:08d}{suffix}"

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
        self.fs.makedirs(self.root, exist_ok=True)
        final = self._path(step, ".pt")
        if isinstance(self.fs, LocalFileSystem):
            tmp = self._path(step, ".pt.tmp")
            self.fs.pipe_file(tmp, buffer.getvalue())
            self.fs.mv(tmp, final)
        else:
            self.fs.pipe_file(final, buffer.getvalue())
        self.fs.pipe_file(self._path(step, ".done"), b"")
        self._prune()
        return self.url(step)

    def save_sharded(self, step: int, meta: dict[str, Any], write: Callable[[str], Future | None], is_main: bool,
                     wait: bool = True, nonfinite: Collection[str] = ()) -> str:  # fmt: skip
        """A sharded checkpoint: every rank calls this; ``write(url)`` writes the DCP part (returning a Future when
        it runs in the background) and the main rank writes ``meta`` and, once all is written, the marker. With
        ``wait`` false an asynchronous write is committed by the next save or ``commit_pending``. Refused before
        anything is written when ``nonfinite`` names a parameter (found on the devices, where the shards are)."""
        path, url = self._path(step, ""), self._url(step, "")
        self._refuse_nonfinite(url, nonfinite)
        self.commit_pending()
        if is_main:
            self.fs.makedirs(path, exist_ok=True)
            buffer = io.BytesIO()
            torch.save(meta, buffer)
            self.fs.pipe_file(f"{path}/{SHARDED_META}", buffer.getvalue())
        self._pending = (step, write(url), is_main)
        if wait:
            self.commit_pending()
        return url

    def commit_pending(self) -> None:
        """Wait for a background checkpoint write, then commit it (main rank)."""
        if self._pending is None:
            return
        step, future, is_main = self._pending
        self._pending = None
        if future is not None:
            future.result()
        if is_main:
            self.fs.pipe_file(self._path(step, ".done"), b"")
            self._prune()
            log.info("committed %s", self.url(step))

    def load_latest(self, set_aside: bool = True) -> tuple[str, dict[str, Any]] | None:
        """The newest committed checkpoint that can be read, as (url, state); None when there is none. Unreadable
        ones on the way are reported by name and, when ``set_aside`` (the main rank), renamed ``*.corrupt``."""
        for step in reversed(self.complete_steps()):
            url = self.url(step)
            try:
                return url, read_checkpoint(url)
            except CheckpointError as e:
                log.warning("skipping a checkpoint that cannot be loaded: %s", e)
                if set_aside:
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
