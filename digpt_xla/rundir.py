"""A run's output directory on any fsspec URL: a local path, ``file://``, ``gs://`` (with the ``gcs`` extra),
``memory://``.

Small results (JSON, plots, reports) are written straight to the URL. Writers that can only append to a local
file (TensorBoard's event files, the metrics log) write into ``staging``: the directory itself when it is local,
otherwise a local temporary directory that ``sync()`` copies to the URL, at most every ``sync_every`` seconds
unless forced (the trainers force it at every checkpoint and at exit), so a preempted VM loses at most the
records since the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import UserError

log = logging.getLogger(__name__)


class RunDirError(UserError, ValueError):
    """An output URL that cannot be used (unknown protocol, missing filesystem package)."""


class RunDir:
    def __init__(self, url: str, sync_every: float = 60.0) -> None:
        self.url = url.rstrip("/") or url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise RunDirError(f"{url}: cannot open this location ({e})") from None
        self.root = self.root.rstrip("/") or self.root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.sync_every = sync_every
        self._staging: str | None = None
        self._uploaded: dict[str, tuple[float, int]] = {}
        self._last_sync = 0.0

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    # ------------------------------------------------------------------ names
    def url_of(self, name: str) -> str:
        """The URL of ``name`` inside the run directory (what users see and what fsspec opens)."""
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def staging(self) -> str:
        """The local directory for local-only writers (created on first use)."""
        if self._staging is None:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
                self._staging = self.root
            else:
                self._staging = tempfile.mkdtemp(prefix="digpt-run-")
        return self._staging

    def staged(self, name: str) -> str:
        return os.path.join(self.staging, name)

    # ------------------------------------------------------------------ direct files
    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def check_writable(self, key: str) -> None:
        """Write and remove a small file now, so that a directory that cannot take the results (read-only, a file,
        a missing bucket) is one line naming ``key`` before the work, not an error after it."""
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise RunDirError(f"{key}={self.url}: is a file, not a directory")
        name = f".digpt-write-check-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(self._path(name), b"")
            self.fs.rm(self._path(name))
        except OSError as e:
            raise RunDirError(f"{key}={self.url}: cannot be written ({e.strerror or e})") from None

    def check_layout(self, folders: tuple[str, ...] = (), files: tuple[str, ...] = ()) -> None:
        """Refuse at start what a save would trip over at the end: a file where a run keeps a folder, or a folder
        where it keeps a file (all the run's work would be lost at its first or final write)."""
        for name, want_dir in [*((n, True) for n in folders), *((n, False) for n in files)]:
            path = self._path(name)
            if self.fs.exists(path) and self.fs.isdir(path) != want_dir:
                what = "a file" if want_dir else "a directory"
                raise RunDirError(
                    f"{self.url_of(name)}: is {what}, where the run keeps its {'folder' if want_dir else 'file'} "
                    f"{name}; move it out of run.out_dir"
                )

    # What a run leaves in its directory besides its lease: a new run there must not mix with them.
    RUN_OUTPUTS = ("metrics.jsonl", "tb", "checkpoints", "run.json", "loss_curve.png")

    def previous_run(self) -> str | None:
        """What another run left here (its logs and checkpoints, in words), or None when nothing."""
        held = []
        if self.exists("metrics.jsonl") and not self.fs.isdir(self._path("metrics.jsonl")):
            steps = []
            with self.fs.open(self._path("metrics.jsonl"), "r") as f:
                for line in f.read().splitlines():
                    with contextlib.suppress(ValueError, AttributeError):  # a torn last line still counts the rest
                        steps.append(int(json.loads(line).get("step", 0)))
            if steps:
                held.append(f"metrics.jsonl with {len(steps)} record{'s' * (len(steps) > 1)} to step {max(steps)}")
        if self.exists("checkpoints") and self.fs.isdir(self._path("checkpoints")):
            names = sorted(
                p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path("checkpoints"), detail=False)
            )
            names = [n for n in names if not n.endswith(".done")]
            if names:
                held.append(
                    "checkpoints " + ", ".join(names[-3:]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
                )
        # TensorBoard's events alone are no run: every start opens a file there before anything is logged.
        if held and self.exists("tb") and self.fs.isdir(self._path("tb")):
            held.append("TensorBoard events (tb/)")
        return "; ".join(held) or None

    def move_aside(self) -> str:
        """Move another run's outputs into ``previous/<UTC time>/`` here; returns that folder's URL."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = f"previous/{stamp}"
        self.fs.makedirs(self._path(target), exist_ok=True)
        for name in self.RUN_OUTPUTS:
            if self.exists(name):
                self.fs.mv(self._path(name), self._path(f"{target}/{name}"), recursive=True)
        self._uploaded.clear()
        return self.url_of(target)

    def write_bytes(self, name: str, data: bytes) -> str:
        path = self._path(name)
        parent = path.rsplit("/", 1)[0]
        try:
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(path, data)
        except (FileExistsError, NotADirectoryError, PermissionError, IsADirectoryError) as e:
            raise RunDirError(f"{self.url_of(name)}: cannot be written ({type(e).__name__}: {e})") from None
        return self.url_of(name)

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj: Any) -> str:
        """Strict JSON: NaN and infinities (an undefined ratio, a statistic of one sample) are written as null."""
        return self.write_text(name, json.dumps(_finite(obj), indent=1, default=str, allow_nan=False) + "\n")

    def read_bytes(self, name: str) -> bytes:
        """The bytes of ``name``: the staged copy when there is one (it is newer), else the URL's."""
        if self._staging is not None and os.path.exists(self.staged(name)):
            with open(self.staged(name), "rb") as f:
                return f.read()
        return self.fs.cat_file(self._path(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    # ------------------------------------------------------------------ staged files
    def pull(self, name: str) -> None:
        """Copy ``name`` (a file or a directory) from the URL into staging, to continue it after a resume."""
        if self.is_local or not self.exists(name):
            return
        target = self.staged(name)
        if self.fs.isdir(self._path(name)):
            self.fs.get(self._path(name), target, recursive=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.get_file(self._path(name), target)
        for local in self._staged_files():
            self._uploaded[local] = self._signature(local)

    def sync_due(self, force: bool = False) -> bool:
        """Whether ``sync`` would copy now: never for a local directory, else when forced or ``sync_every`` passed."""
        if self.is_local or self._staging is None:
            return False
        return force or time.monotonic() - self._last_sync >= self.sync_every

    def sync(self, force: bool = False) -> None:
        """Copy staged files that changed since the last sync to the URL (nothing to do for a local directory)."""
        if not self.sync_due(force):
            return
        self._last_sync = time.monotonic()
        for local in self._staged_files():
            signature = self._signature(local)
            if self._uploaded.get(local) == signature:
                continue
            name = os.path.relpath(local, self._staging).replace(os.sep, "/")
            with open(local, "rb") as f:
                self.write_bytes(name, f.read())
            self._uploaded[local] = signature

    def close(self) -> None:
        """Final sync; the local staging copy of a remote directory is removed."""
        self.sync(force=True)
        if not self.is_local and self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
            self._uploaded.clear()

    def _staged_files(self) -> list[str]:
        if self._staging is None:
            return []
        return [os.path.join(d, f) for d, _, files in os.walk(self._staging) for f in sorted(files)]

    @staticmethod
    def _signature(path: str) -> tuple[float, int]:
        st = os.stat(path)
        return st.st_mtime, st.st_size


class RunLease:
    """One run per run directory: the main rank holds ``lease.json`` (owner, host, pid, heartbeat) and renews it
    from a daemon thread. Object stores have no locks, so this is a lease, not a lock: a second run that finds a
    live holder refuses with one line naming it; a holder silent for ``stale_after`` seconds, or a process on this
    host that no longer exists, is taken over with a warning. Two runs that start within the same instant are told
    apart by reading the lease back after a pause: the later writer wins, the other refuses."""

    NAME = "lease.json"

    def __init__(self, run_dir: RunDir, heartbeat: float = 30.0, stale_after: float = 120.0) -> None:
        self.run_dir, self.heartbeat, self.stale_after = run_dir, heartbeat, stale_after
        self.owner = uuid.uuid4().hex
        self.lost: str | None = None  # who took the lease over, once someone has
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": time.time(),
            "command": " ".join(sys.argv)[:500],
        }

    # The fields a lease must have, and their types: anything else is named, not half-read.
    FIELDS: ClassVar[dict[str, tuple[tuple[type, ...], str]]] = {
        "owner": ((str,), "a string"),
        "host": ((str,), "a string"),
        "pid": ((int,), "an integer"),
        "heartbeat": ((int, float), "a number"),
    }

    def _read(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.run_dir.read_text(self.NAME))
        except (ValueError, OSError):
            return None  # missing, torn or unreadable: nobody can be shown to hold it
        if not isinstance(record, dict):
            return None
        for key, (types, kind) in self.FIELDS.items():
            value = record.get(key)
            if not isinstance(value, types) or isinstance(value, bool):
                raise RunDirError(
                    f"{self.run_dir.url_of(self.NAME)}: field {key!r} is {value!r}, not {kind}; if no run uses this "
                    "directory, delete the file"
                )
        return record

    def check_seen_by(self, owner: str | None, rank: int) -> None:
        """On a rank other than the main one: the lease that the main rank (``owner``) holds must be visible here,
        or the ranks write their parts of a checkpoint to different places (node-local disks, ``memory://``)."""
        held = self._read()
        if owner is not None and (held is None or held.get("owner") != owner):
            raise RunDirError(
                f"run.out_dir={self.run_dir.url}: rank {rank} does not see the lease.json that the main rank holds "
                "there; every rank must write to the same storage (gs://, a shared filesystem), not a disk or memory "
                "of its own"
            )

    @staticmethod
    def _this_process(held: dict[str, Any]) -> bool:
        """Whether the lease was written by this very process (an earlier or later trainer of it)."""
        return held.get("host") == socket.gethostname() and held.get("pid") == os.getpid()

    def _why_free(self, held: dict[str, Any]) -> str | None:
        """Why a lease someone else wrote no longer binds (None: it does)."""
        age = time.time() - float(held.get("heartbeat", 0))
        if -age > self.stale_after:  # no clock is that far ahead: a lease that could never go stale is not trusted
            return f"its heartbeat is {-age:.0f}s in the future (> {self.stale_after:g}s of clock difference)"
        if self._this_process(held):
            return ""  # an earlier trainer of this same process
        if held.get("host") == socket.gethostname():
            pid = int(held.get("pid", -1))
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"its process {pid} on this host is gone"
            except (PermissionError, OverflowError, ValueError):
                pass
        if age > self.stale_after:
            return f"its heartbeat is {age:.0f}s old (> {self.stale_after:g}s)"
        return None

    def _describe(self, held: dict[str, Any]) -> str:
        age = time.time() - float(held.get("heartbeat", 0))
        when = f"{age:.0f}s ago" if age >= 0 else f"{-age:.0f}s in the future"
        return f"host {held.get('host')} pid {held.get('pid')}, heartbeat {when}"

    def acquire(self, settle: float | None = None) -> None:
        """Take the lease or refuse; ``settle``: the pause before reading it back (longer on object stores, whose
        writes take longer to show)."""
        settle = settle if settle is not None else 0.1 if self.run_dir.is_local else 1.0
        if self.run_dir.fs.exists(self.run_dir.root) and not self.run_dir.fs.isdir(self.run_dir.root):
            raise RunDirError(f"{self.run_dir.url}: is a file, not a directory (run.out_dir)")
        held = self._read()
        if held is not None and held.get("owner") != self.owner:
            why = self._why_free(held)
            if why is None:
                raise RunDirError(
                    f"{self.run_dir.url} is in use by another run ({self._describe(held)}); one run per run.out_dir "
                    f"(a silent holder is taken over after {self.stale_after:g}s)"
                )
            if why:
                log.warning("taking over the lease of %s from a dead run: %s", self.run_dir.url, why)
        try:
            self.run_dir.write_json(self.NAME, self._record())
        except OSError as e:
            raise RunDirError(f"{self.run_dir.url}: cannot write to the run directory ({e})") from None
        time.sleep(settle)
        held = self._read()
        if held is None or held.get("owner") != self.owner:
            raise RunDirError(
                f"{self.run_dir.url} was claimed by another run starting at the same time "
                f"({self._describe(held or {})}); one run per run.out_dir"
            )
        self._thread = threading.Thread(target=self._renew, name="digpt-lease", daemon=True)
        self._thread.start()

    def still_held(self) -> bool:
        """Whether this run still holds the lease, read now (before a write that must not land in another run's
        directory); once it is lost, ``lost`` names who holds it."""
        if self.lost:
            return False
        try:
            held = self._read()
        except RunDirError:
            return True  # garbage in place of the lease: the next heartbeat writes this run's record again
        if held is not None and held.get("owner") != self.owner and not self._this_process(held):
            self.lost = self._describe(held)
            log.error("the lease of %s was taken over by %s", self.run_dir.url, self.lost)
            return False
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                held = self._read()
            except RunDirError as e:  # overwritten with garbage while held: this run's record replaces it
                log.warning("%s", e)
                held = None
            if held is not None and held.get("owner") != self.owner:
                if self._this_process(held):
                    return  # a later trainer of this same process holds it now: this one is no longer used
                self.lost = self._describe(held)
                log.error("the lease of %s was taken over by %s", self.run_dir.url, self.lost)
                return
            try:
                self.run_dir.write_json(self.NAME, self._record())
            except (OSError, RunDirError) as e:  # transient on object stores: the next beat tries again
                log.warning("could not renew the lease of %s: %s", self.run_dir.url, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        self._thread = None
        try:
            held = self._read()
        except RunDirError:
            return  # not this run's record any more
        if held is not None and held.get("owner") == self.owner:
            with contextlib.suppress(OSError):  # already gone
                self.run_dir.fs.rm(self.run_dir._path(self.NAME))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
