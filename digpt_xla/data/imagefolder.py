"""ImageNet-layout folders (``root/<class>/<image>``), indexed by ``(i, seed)`` like every map-style source."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from .errors import DataError, SkipCounter, log
from .transforms import decode_image, seeded

MAX_CONSECUTIVE_FAILURES = 50


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, label) pairs and the class map; a clear DataError for a missing or empty folder."""
    if not os.path.isdir(root):
        raise DataError(f"data.root: {root!r} is not a directory (expected ImageNet layout root/<class>/<image>)")
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError as e:
        raise DataError(f"data.root: no class folders under {root!r} (expected root/<class>/<image>)") from e
    except OSError as e:  # a link to itself (ELOOP), an unreadable entry: named, not a traceback
        raise DataError(f"data.root: {e.filename or root}: {e.strerror or e}") from None
    root_real = os.path.realpath(root)
    around = [name for name in classes if _contains(os.path.realpath(os.path.join(root, name)), root_real)]
    for name in around:
        log.warning("%s: class folder %r leads back to the root (a symlink); not a class", root, name)
    if around:
        classes = [name for name in classes if name not in around]
        class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = [(path, class_to_idx[name]) for name in classes for path in _image_files(os.path.join(root, name))]
    if not samples:
        raise DataError(
            f"data.root: no images ({', '.join(IMG_EXTENSIONS)}) in the {len(classes)} class folders of {root!r}"
        )
    present = {label for _, label in samples}
    for name in classes:
        if class_to_idx[name] not in present:
            log.warning("%s: class folder %r holds no image", root, name)
    return samples, class_to_idx


def _image_files(class_dir: str) -> list[str]:
    """Image files under ``class_dir``, sorted, following symlinked folders but entering each real folder once:
    a link back to a parent (a loop) would otherwise repeat the same images until the path length runs out, and a
    link up to the dataset's root (``ln -s .. up``) would file every other class under this one. Only regular files
    of at most ``MAX_IMAGE_BYTES`` count: a FIFO named ``x.png`` would block its reader forever, ``/dev/zero``
    would never end."""
    found, seen = [], set()
    class_real = os.path.realpath(class_dir)
    for folder, subdirs, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or (folder != class_dir and _contains(real, class_real)):
            log.warning("%s: a symlinked folder leads back to %s; not followed again", folder, real)
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs.sort()
        found += [
            path
            for path in (os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS))
            if _readable_image_file(path)
        ]
    return found


MAX_IMAGE_BYTES = 256 * 2**20


def _contains(folder: str, path: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _readable_image_file(path: str) -> bool:
    try:
        info = os.stat(path)
    except OSError as e:  # a broken link, or a permission problem: named, not fatal
        log.warning("%s: cannot be read (%s); left out", path, e.strerror)
        return False
    if not stat.S_ISREG(info.st_mode):
        log.warning("%s: not a regular file (a FIFO, device or socket); left out", path)
        return False
    if info.st_size > MAX_IMAGE_BYTES:
        log.warning("%s: %d bytes, more than any image here (%d); left out", path, info.st_size, MAX_IMAGE_BYTES)
        return False
    return True


class ImageFolderDataset(Dataset):
    """``dataset[(i, seed)]`` decodes image i and augments it with ``transform`` seeded by ``seed``.

    An unreadable image is logged (file and index), counted in ``"skipped"``, and replaced by the next readable
    one, so batches keep their fixed size; more than ``MAX_CONSECUTIVE_FAILURES`` unreadable images in a row
    raise DataError.
    """

    def __init__(self, root: str, transform: Callable) -> None:
        self.root = root
        self.samples, self.class_to_idx = scan_image_folder(root)
        self.transform = transform
        self.skips = SkipCounter()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Tensor]:
        i, seed = key if isinstance(key, tuple) else (key, 0)
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            j = (i + attempt) % len(self.samples)
            path, label = self.samples[j]
            try:
                with open(path, "rb") as f:
                    image = decode_image(f.read())
            except Exception as e:  # PIL raises many types for bad files
                self.skips.skip(self.root, path, e)
                continue
            return {
                "images": seeded(self.transform, image, seed),
                "labels": torch.tensor(label),
                "index": torch.tensor(j),
                "skipped": torch.tensor(self.skips.take()),
            }
        raise DataError(f"{self.root}: {MAX_CONSECUTIVE_FAILURES} unreadable images in a row from index {i}")
