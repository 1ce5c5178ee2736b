"""What a trainer's checkpoint holds and how it goes back: the one save and the one resume of every trainer.

A checkpoint holds the model and optimizer tensors (whole on the host for one file; as placed, through DCP, for a
sharded run), RNG states, config, run plan and git revision, plus the trainer's own ``state_dict`` (step, loss
scaler, data position; EMA weights, Mixup's generator, evaluation history). ``run.resume`` means the same in every
trainer: ``auto`` (the newest readable committed checkpoint of ``run.out_dir``), ``never``, or a path or URL.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..repo import git_revision
from .manager import CheckpointManager, check_sharded_complete
from .reader import CheckpointError, check_state_dict, load_model_state, read_checkpoint

log = logging.getLogger(__name__)


class Checkpointable(Protocol):
    """What a checkpoint holds of a trainer and what restores it. Every trainer provides it; this package never
    imports the engine (the checkpoint layer sits below it). The model and the optimizer are stored here, placed by
    the backend (whole, or sharded through DCP); everything else of the trainer is its own ``state_dict``."""

    kind: str  # "pretrain" or "finetune": a checkpoint resumes only its own kind
    step: int
    cfg: Any  # the run's Config: its run.resume and to_dict() (config sits above this package)
    backend: Any  # a Backend: its placement, state I/O and RNG
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], url: str) -> None: ...

    def resolved_plan(self) -> dict[str, Any]: ...


def resume_checkpoint(resume: str, manager: CheckpointManager) -> tuple[str, dict[str, Any]] | None:
    """(url, state) to resume from, per ``run.resume``: ``never``; ``auto`` = the newest committed checkpoint that
    loads (unreadable ones are set aside); anything else is a path or URL that must load. The main rank's call."""
    if resume == "never":
        return None
    if resume == "auto":
        return manager.load_latest()
    return resume, read_checkpoint(resume)


def dcp_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The keys DCP gives the tensors of a nested dict (names joined by dots), with their global shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            shapes |= dcp_shapes(value, f"{name}.")
        elif isinstance(value, Tensor):
            shapes[name] = tuple(value.shape)
    return shapes


class TrainingCheckpoint:
    """Saves and restores a ``Trainer`` through its ``CheckpointManager``: single-file and DCP layouts, and
    single-file checkpoints into sharded runs."""

    def __init__(self, trainer: Checkpointable, manager: CheckpointManager) -> None:
        self.trainer, self.manager = trainer, manager

    def run_state(self) -> dict[str, Any]:
        """Everything a checkpoint holds besides model and optimizer tensors."""
        t = self.trainer
        b = t.backend
        return {
            "kind": t.kind,
            "rng": b.rng_state(),
            "config": t.cfg.to_dict(),  # as written (auto stays auto) ...
            "plan": t.resolved_plan(),  # ... and what each setting resolved to on this runtime
            "git_revision": git_revision(),
            **t.state_dict(),  # step, loss scaler, data position, and what the trainer adds
        }

    def single_file_state(self) -> dict[str, Any]:
        """The single-file checkpoint of an unsharded run: whole tensors on the host."""
        t = self.trainer
        b = t.backend
        return {
            "model": b.model_state_cpu(t.model),
            "optimizer": b.to_cpu(t.optimizer.state_dict()),
            **self.run_state(),
        }

    def sharded_tensors(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """({"model": ..., "optimizer": {"state": ...}} keyed by parameter names, tensors as placed; the optimizer's
        param groups): the DCP part of a sharded checkpoint and the plain part that goes with ``run_state``."""
        t = self.trainer
        model_state, optim_state = t.backend.training_state(t.model, t.optimizer)
        return {"model": model_state, "optimizer": {"state": optim_state["state"]}}, optim_state["param_groups"]

    def load(self, state: dict[str, Any], url: str) -> None:
        t = self.trainer
        kind = state.get("kind")
        if kind != t.kind:
            raise CheckpointError(
                f"{url}: a {kind or 'unlabelled'} checkpoint cannot resume {t.kind} (run.resume); a finetuning run "
                "starts from a pretraining checkpoint through finetune.checkpoint"
            )
        b = t.backend
        if "sharded" in state:  # DCP: read in place into this run's placement, whatever fsdp size wrote it
            tensors, _ = self.sharded_tensors()
            check_sharded_complete(state["sharded"], dcp_shapes(tensors), doing="cannot resume from")
            b.read_sharded(tensors, state["sharded"])
            groups = with_backend_options(t.optimizer, state["optimizer_param_groups"])
            optimizer_state = {"state": tensors["optimizer"]["state"], "param_groups": groups}
            b.load_training_state(t.model, t.optimizer, tensors["model"], optimizer_state)
        elif b.shards_state:  # a single-file checkpoint into a sharded run: whole tensors, split on load
            check_state_dict(b.unwrap(t.model).state_dict(), state["model"], url)
            by_name = optimizer_state_by_name(t.optimizer, b.unwrap(t.model), state["optimizer"])
            b.load_training_state(t.model, t.optimizer, state["model"], by_name, full=True)
        else:
            load_model_state(b.unwrap(t.model), state["model"], url)
            saved = state["optimizer"]
            t.optimizer.load_state_dict(
                saved | {"param_groups": with_backend_options(t.optimizer, saved["param_groups"])}
            )
            b.place_optimizer_state(t.optimizer)
        try:
            b.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{url}: entry 'rng' is not a random-generator state this run can restore ({e})"
            ) from None
        t.load_state_dict(state, url)

    def resume(self) -> str | None:
        t = self.trainer
        b = t.backend
        # The main rank chooses (and sets aside what it cannot read); every rank then loads that one checkpoint, so
        # a read that fails on one rank only cannot send the ranks to different steps. Its files were checked
        # against their sizes and SHA-256 by the main rank: the others do not read every file once more for that.
        found = resume_checkpoint(t.cfg.run.resume, self.manager) if b.is_main else None
        url = b.from_main(found[0] if found else None)
        if url is None:
            return None
        state = found[1] if found else read_checkpoint(url, verify=False)
        self.load(state, url)
        log.info("resumed from %s at step %d", url, t.step)
        return url

    def save(self, final: bool = False) -> str | None:
        """Write (every rank) and commit (the main rank) a checkpoint of the trainer's current step: one file, or a
        sharded one written in the background except the ``final`` one, committed before this returns."""
        t = self.trainer
        b = t.backend
        if b.shards_state:
            return self._save_sharded(final)
        state = self.single_file_state()  # every rank takes part: on XLA this syncs pending work
        url = None
        if b.is_main:
            parameters = [n for n, _ in b.unwrap(t.model).named_parameters()]
            url = self.manager.save(state, t.step, parameters)
            log.info("saved %s", url)
        return url

    def _save_sharded(self, final: bool) -> str:
        t = self.trainer
        b = t.backend
        nonfinite = b.nonfinite_parameters(list(b.unwrap(t.model).named_parameters()))
        tensors, param_groups = self.sharded_tensors()
        meta = self.run_state() | {"optimizer_param_groups": b.to_cpu(param_groups)}
        log.info("saving %s%s", self.manager.url_of(t.step), "" if final else " (in the background)")
        return self.manager.save_sharded(
            t.step,
            meta,
            lambda url: b.write_sharded(tensors, url, asynchronous=not final),
            b.is_main,
            expected=dcp_shapes(tensors),
            wait=final,
            nonfinite=nonfinite,
        )


BACKEND_OPTIONS = ("capturable", "fused", "foreach", "differentiable")  # how a backend runs AdamW, not its state


def with_backend_options(optimizer: torch.optim.Optimizer, saved_groups: list[dict[str, Any]]) -> list[dict]:
    """Saved param groups with this run's backend options: a checkpoint written on XLA (capturable) or CUDA (fused)
    resumes on any backend."""
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this run builds "
            f"{len(optimizer.param_groups)} (another model or weight-decay rule)"
        )
    return [
        {**saved, **{k: group[k] for k in BACKEND_OPTIONS if k in group}}
        for group, saved in zip(optimizer.param_groups, saved_groups, strict=True)
    ]


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict[str, Any]) -> dict:
    """A ``torch.optim`` state dict (per-parameter state keyed by position) re-keyed by parameter name, as
    ``torch.distributed.checkpoint.state_dict`` takes it. Positions follow ``optimizer``'s param groups, which
    the same model and weight-decay rule build in the same order."""
    names = {p: n for n, p in model.named_parameters()}
    index_to_name = {}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        for p, index in zip(group["params"], saved_group["params"], strict=True):
            index_to_name[index] = names[p]
    groups = [
        {**g, "params": [index_to_name[i] for i in g["params"]]}
        for g in with_backend_options(optimizer, saved["param_groups"])
    ]
    return {"state": {index_to_name[i]: v for i, v in saved["state"].items()}, "param_groups": groups}
