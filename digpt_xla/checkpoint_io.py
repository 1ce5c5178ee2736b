"""Reading checkpoints, ours and anyone's, without running code from them.

Every torch file goes through ``torch.load(weights_only=True)``: tensors and plain containers only. This project
writes its own training checkpoints in that form (RNG states as tensors and tuples, the config as a dict), so
there is no second, trusting loader. A file that cannot be read this way is refused with one line naming it.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from torch import Tensor

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
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
        with warnings.catch_warnings():
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


def read_checkpoint(url: str) -> dict[str, Any]:
    """A training checkpoint of this project (weights, optimizer, RNG, data position, config)."""
    state = load_torch_payload(read_bytes(url), url)
    if not isinstance(state, Mapping) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{url}: not a digpt_xla training checkpoint (no 'model' and 'step' entries)")
    return dict(state)


def read_state_dict(url: str) -> dict[str, Tensor]:
    """The weights in a checkpoint on any fsspec filesystem (local, gs://, memory://): ours, the release's, or a
    plain state dict.

    ``.safetensors`` is read with safetensors; ``.pt``/``.pth``/``.bin`` with ``torch.load(weights_only=True)``.
    A wrapping ``state_dict``/``model`` entry and a DDP ``module.`` prefix are removed.
    """
    suffix = next((s for s in STATE_DICT_SUFFIXES if url.endswith(s)), None)
    if suffix is None:
        raise CheckpointError(f"{url}: unsupported checkpoint type; expected one of {', '.join(STATE_DICT_SUFFIXES)}")
    payload = read_bytes(url)
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            state: Any = load_safetensors(payload)
        except (SafetensorError, ValueError, OSError) as e:
            raise CheckpointError(f"{url}: not a readable safetensors file ({e})") from None
    else:
        state = load_torch_payload(payload, url)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{url}: holds a {type(state).__name__}, not a state dict")
    bad = next((k for k, v in state.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{url}: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    return {k.removeprefix("module."): v for k, v in state.items()}


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
