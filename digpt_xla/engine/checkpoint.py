"""Checkpoints on any fsspec filesystem, written so that a reader never sees a partial one.

Layout: ``<dir>/ckpt-<step>.pt`` plus a ``ckpt-<step>.done`` marker written after the data. Object stores
have no atomic rename, so the marker is the commit: readers ignore checkpoints without one. On local disks
the data is additionally written to a temporary name and renamed.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
_NAME = re.compile(r"ckpt-(\d+)\.pt$")


class CheckpointManager:
    def __init__(self, directory: str, keep_last: int = 3) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(directory)
        self.directory = directory.rstrip("/")
        self.keep_last = keep_last

    def _path(self, step: int, suffix: str) -> str:
        return f"{self.root.rstrip('/')}/ckpt-{step:08d}{suffix}"

    def url(self, step: int) -> str:
        return f"{self.directory}/ckpt-{step:08d}.pt"

    def complete_steps(self) -> list[int]:
        """Steps with a committed checkpoint, oldest first."""
        if not self.fs.exists(self.root):
            return []
        names = {p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)}
        steps = []
        for name in names:
            m = _NAME.match(name)
            if m and name.replace(".pt", ".done") in names:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> str | None:
        steps = self.complete_steps()
        return self.url(steps[-1]) if steps else None

    def save(self, state: dict[str, Any], step: int) -> str:
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

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for step in self.complete_steps()[: -self.keep_last]:
            self.fs.rm(self._path(step, ".done"))  # uncommit first: a crash here leaves no half checkpoint
            self.fs.rm(self._path(step, ".pt"))


def load_checkpoint(url: str) -> dict[str, Any]:
    """Read a training checkpoint (weights, optimizer, RNG and config: plain containers and tensors only)."""
    with fsspec.open(url, "rb") as f:
        payload = f.read()
    # weights_only=False: RNG states hold numpy arrays and Python tuples. Only load checkpoints you wrote.
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
