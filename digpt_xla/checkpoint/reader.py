"""Reading checkpoints, ours and anyone's, without running code from them.

Every torch file goes through ``torch.load(weights_only=True)``: tensors and plain containers only. This project
writes its own training checkpoints in that form (RNG states as tensors and tuples, the config as a dict), so
there is no second, trusting loader. A file that cannot be read this way is refused with one line naming it.

Sharded checkpoints (``torch.distributed.checkpoint``, DCP) are a directory: ``meta.pt`` (everything but the
sharded tensors, read as above) and DCP's files for ``model`` and ``optimizer``. DCP itself unpickles its
``.metadata`` with plain ``pickle`` and loads non-tensor entries with ``weights_only=False``; ``SafeDcpReader``
unpickles only DCP's own metadata classes and refuses any non-tensor entry, so neither path runs.

The release's checkpoints (MAE's ``save_model``) also hold ``args``, an ``argparse.Namespace``: plain data, the one
class allowed beyond torch's own. A checkpoint committed by this project has a ``.done`` marker that lists the size
and SHA-256 of every file it consists of; readers check them, so a truncated, missing or foreign file is named.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import warnings
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from torch import Tensor

from ..errors import UserError

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
SHARDED_META = "meta.pt"  # in a sharded checkpoint's directory: step, data position, RNG, config, ...


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read safely or does not fit what it is loaded into."""


def read_bytes(url: str) -> bytes:
    """The whole file at a local path or fsspec URL; CheckpointError when it is missing or unreadable."""
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{url}: checkpoint not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{url}: cannot be read ({type(e).__name__}: {e})") from None


def _why_unpickling_failed(error: Exception) -> str:
    """The informative line of torch's long weights_only message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[-1] if lines else type(error).__name__


def load_torch_payload(payload: bytes, url: str) -> Any:
    """``torch.load(weights_only=True)`` of a file's bytes, every failure as one CheckpointError naming ``url``."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{url}: refused, it cannot be loaded safely (weights_only=True: {_why_unpickling_failed(e)}); "
            "only tensors and plain containers are accepted"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, AttributeError, IndexError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{url}: not a readable torch checkpoint (truncated or corrupt? {first})") from None


def is_sharded(url: str) -> bool:
    """True for a sharded (DCP) checkpoint: a directory with ``meta.pt`` in it."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isdir(path) and fs.exists(f"{path.rstrip('/')}/{SHARDED_META}")


# ---------------------------------------------------------------------------------------------- commit records
def marker_url(url: str) -> str:
    """The ``.done`` commit marker of the checkpoint file or directory at ``url``."""
    return url.rstrip("/").removesuffix(".pt") + ".done"


def digest(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_digest(url: str) -> dict[str, Any]:
    """Size and SHA-256 of a file, streamed (shards can be larger than memory should hold twice)."""
    sha, size = hashlib.sha256(), 0
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def commit_record(url: str) -> dict[str, Any] | None:
    """The file list of a checkpoint's marker; None for a marker without one (written before markers had it) and
    for a checkpoint that has no marker beside it (a file handed over on its own)."""
    fs, path = fsspec.core.url_to_fs(marker_url(url))
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        return None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
        files = record["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise TypeError("files")
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{marker_url(url)}: commit marker is not a file list (damaged?)") from None
    return record


def verify_files(url: str, payload: bytes | None = None) -> None:
    """Check every file the commit record lists against its size and SHA-256 (``payload``: the bytes of a
    single-file checkpoint already in memory). A checkpoint without a record passes unchecked."""
    record = commit_record(url)
    if record is None:
        return
    base = url.rstrip("/").rsplit("/", 1)[0]
    fs = fsspec.core.url_to_fs(url)[0]
    for name, expected in sorted(record["files"].items()):
        file_url = f"{base}/{name}"
        if payload is not None and file_url == url.rstrip("/"):
            found = digest(payload)
        else:
            try:
                size = fs.size(fsspec.core.url_to_fs(file_url)[1])
            except FileNotFoundError:
                raise CheckpointError(f"{file_url}: missing from the committed checkpoint {url}") from None
            if size != expected["size"]:
                raise CheckpointError(
                    f"{file_url}: {size} bytes where the checkpoint committed {expected['size']} (truncated?)"
                )
            found = file_digest(file_url)
        if found != expected:
            what = "size" if found["size"] != expected["size"] else "SHA-256"
            raise CheckpointError(
                f"{file_url}: {what} differs from what {marker_url(url)} committed (damaged, or a file of another "
                "checkpoint)"
            )


# ---------------------------------------------------------------------------------------------- training state


def _check_training_state(state: Any, url: str, sharded: bool) -> dict[str, Any]:
    """One line naming the entry when a safely loaded file does not have a training checkpoint's structure."""
    what = "sharded checkpoint's meta.pt" if sharded else "training checkpoint"
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{url}: holds a {type(state).__name__}, not a digpt_xla {what}")
    required = {"step": int, "rng": Mapping}
    required |= {"optimizer_param_groups": list} if sharded else {"model": Mapping, "optimizer": Mapping}
    for key, kind in required.items():
        if key not in state:
            raise CheckpointError(f"{url}: not a digpt_xla {what} (no {key!r} entry)")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{url}: entry {key!r} is a {type(state[key]).__name__}, expected {kind.__name__}")
    if not 0 <= state["step"] < 2**53:  # past 2**53 a step no longer survives a float (TensorBoard, lr schedule)
        raise CheckpointError(f"{url}: entry 'step' is {state['step']}, not a step count (0 to 2**53)")
    if not sharded and not {"state", "param_groups"} <= set(state["optimizer"]):
        raise CheckpointError(f"{url}: entry 'optimizer' is not an optimizer state dict (no 'state'/'param_groups')")
    return dict(state)


def read_checkpoint(url: str, verify: bool = True) -> dict[str, Any]:
    """A training checkpoint of this project (weights, optimizer, RNG, data position, config), its files checked
    against its commit record (unless ``verify`` is false: a rank loading what the main rank has just checked).

    For a sharded checkpoint this is its ``meta.pt`` with ``sharded`` = the directory's URL: the model and optimizer
    tensors are read by whoever knows their placement (the trainer, through DCP, or ``read_sharded_tensors``)."""
    if is_sharded(url):
        if verify:
            verify_files(url)
        # Unreadable or foreign DCP metadata fails here, and a missing or short shard file (a checkpoint never
        # committed has no record to check against) is named, before any tensor is read.
        check_shard_files(url, dcp_reader(url).read_metadata())
        meta_url = f"{url.rstrip('/')}/{SHARDED_META}"
        state = _check_training_state(load_torch_payload(read_bytes(meta_url), meta_url), meta_url, sharded=True)
        return state | {"sharded": url.rstrip("/")}
    payload = read_bytes(url)
    if verify:
        verify_files(url, payload)
    return _check_training_state(load_torch_payload(payload, url), url, sharded=False)


# DCP's .metadata holds instances of these classes (and torch dtypes / Size); nothing else is unpickled.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def _safe_dcp_reader():
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

    class SafeDcpReader(FsspecReader):
        """DCP's fsspec reader with a metadata unpickler limited to DCP's own classes; refuses non-tensor entries
        (DCP would ``torch.load`` them with ``weights_only=False``)."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            url = str(self.path)
            path = self.fs.concat_path(self.path, ".metadata")
            try:
                with self.fs.create_stream(path, "rb") as f:
                    metadata = _DcpMetadataUnpickler(f).load()
            except FileNotFoundError:
                raise CheckpointError(f"{url}: sharded checkpoint without DCP .metadata (incomplete?)") from None
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                raise CheckpointError(f"{url}/.metadata: refused, not DCP metadata ({e})") from None
            entries = getattr(metadata, "state_dict_metadata", None)
            if not isinstance(entries, dict):
                raise CheckpointError(f"{url}/.metadata: refused, not DCP metadata")
            bad = next((k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata)), None)
            if bad is not None:
                raise CheckpointError(f"{url}: entry {bad!r} is not a tensor; refused (it would be unpickled)")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeDcpReader


def dcp_reader(url: str):
    """A DCP storage reader for the sharded checkpoint at ``url`` (any fsspec URL) that unpickles nothing foreign."""
    return _safe_dcp_reader()(url.rstrip("/"))


def check_shard_files(url: str, metadata: Any) -> None:
    """Every file the DCP metadata points into exists and reaches the last byte read from it: a half-written or
    half-copied checkpoint names its first missing or short file instead of failing inside DCP."""
    fs, root = fsspec.core.url_to_fs(url)
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        name = getattr(item, "relative_path", None)
        if name is not None:
            needed[name] = max(needed.get(name, 0), int(item.offset) + int(item.length))
    for name, end in sorted(needed.items()):
        path = f"{root.rstrip('/')}/{name}"
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise CheckpointError(f"{url}/{name}: missing (the checkpoint's metadata reads from it)") from None
        if size is None or size < end:
            raise CheckpointError(f"{url}/{name}: {size} bytes, the checkpoint's metadata reads up to byte {end}")


def read_sharded_tensors(url: str, prefix: str = "model") -> dict[str, Tensor]:
    """The ``prefix`` part (``model`` or ``optimizer``) of a sharded checkpoint, consolidated into whole CPU tensors
    in this process (as large as the full state: for tools, not for training)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    metadata = dcp_reader(url).read_metadata()  # refuses foreign metadata with a CheckpointError of its own
    head = f"{prefix}."
    # Whole tensors shaped from the metadata; DCP fills them from every rank's shards.
    wanted = {
        key.removeprefix(head): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(head)
    }
    if not wanted:
        raise CheckpointError(f"{url}: sharded checkpoint has no {prefix!r} entries")
    check_shard_files(url, metadata)
    state = {prefix: wanted}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed.*")
            dcp.load(state, storage_reader=dcp_reader(url), no_dist=True)
    except CheckpointException as e:
        raise CheckpointError(f"{url}: sharded checkpoint cannot be read ({error_summary(dcp_cause(e))})") from None
    return dict(state[prefix])


def dcp_cause(e: BaseException) -> BaseException:
    """The first rank's own exception in DCP's ``CheckpointException`` (which prints every rank's frames)."""
    cause = next(iter(getattr(e, "failures", {}).values()), e)
    cause = cause[0] if isinstance(cause, tuple) and cause and isinstance(cause[0], BaseException) else cause
    return cause if isinstance(cause, BaseException) else e


def error_summary(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for a one-line report."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or ['(no message)'])[0]}"


def read_state_dict(url: str) -> dict[str, Tensor]:
    """The weights in a checkpoint on any fsspec filesystem (local, gs://, memory://): ours (single file or
    sharded), the release's, or a plain state dict.

    ``.safetensors`` is read with safetensors; ``.pt``/``.pth``/``.bin`` with ``torch.load(weights_only=True)``.
    A wrapping ``state_dict``/``model`` entry and a DDP ``module.`` prefix are removed.
    """
    return read_weights(url)[0]


def read_weights(url: str) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """``read_state_dict``'s weights and, read in the same pass, the ``model`` section of the config that a training
    checkpoint of this project was written with (None for the release's checkpoints and plain state dicts)."""
    if is_sharded(url):
        verify_files(url)
        meta_url = f"{url.rstrip('/')}/{SHARDED_META}"
        meta = load_torch_payload(read_bytes(meta_url), meta_url)
        return read_sharded_tensors(url, "model"), _model_config(meta)
    suffix = next((s for s in STATE_DICT_SUFFIXES if url.endswith(s)), None)
    if suffix is None:
        fs, path = fsspec.core.url_to_fs(url)
        name = url.rstrip("/").rsplit("/", 1)[-1]
        what = (
            "a directory without meta.pt, not a sharded checkpoint"
            if fs.isdir(path)
            else f"unsupported checkpoint type {'.' + name.rsplit('.', 1)[-1] if '.' in name else '(no suffix)'}"
        )
        raise CheckpointError(
            f"{url}: {what}; a checkpoint is a {'/'.join(STATE_DICT_SUFFIXES)} file or a sharded checkpoint "
            "directory (with meta.pt)"
        )
    payload = read_bytes(url)
    verify_files(url, payload)
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            state: Any = load_safetensors(payload)
        except (SafetensorError, ValueError, OSError) as e:
            raise CheckpointError(f"{url}: not a readable safetensors file ({e})") from None
    else:
        state = load_torch_payload(payload, url)
    config = _model_config(state)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{url}: holds a {type(state).__name__}, not a state dict")
    bad = next((k for k, v in state.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{url}: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    return {k.removeprefix("module."): v for k, v in state.items()}, config


def _model_config(state: Any) -> dict[str, Any] | None:
    config = state.get("config") if isinstance(state, Mapping) else None
    model = config.get("model") if isinstance(config, Mapping) else None
    return dict(model) if isinstance(model, Mapping) else None


def check_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], source: str) -> None:
    """Raise one CheckpointError naming the first missing, unexpected or mis-shaped key (with shapes)."""
    for key, ref in expected.items():
        if key not in found:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {tuple(ref.shape)})")
        if tuple(found[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(found[key].shape)}, expected {tuple(ref.shape)}"
            )
    for key, value in found.items():
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key {key!r} (shape {tuple(value.shape)})")


def load_model_state(model: torch.nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a mismatch reported as one CheckpointError."""
    check_state_dict(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)
