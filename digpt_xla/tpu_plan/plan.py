"""A TPU plan of the training step: trace it on XLA:CPU (child process with torch_xla), compile it for a topology
with libtpu (child process with jax[tpu]), and put memory, fit, collectives and an estimated step time together.

Neither torch_xla nor jax is imported here: each runs in its own child process, since both bring their own XLA.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backend.mesh import ParallelDims
from ..errors import UserError
from ..precision import PRECISIONS
from .chips import chips_in, estimate
from .hlo_program import WIRE_FORMULA, analyse
from .libtpu_log import read_compile_log

LIBTPU_SCRIPT = Path(__file__).with_name("libtpu_compile.py")
REPO = Path(__file__).resolve().parents[2]


class PlanError(UserError, RuntimeError):
    """A plan that cannot be made: no jax[tpu], an unknown topology, a layout the topology cannot hold."""


@dataclass
class PlanRequest:
    model: str
    topology: str
    fsdp: int = 1
    batch: int = 8  # per device
    precision: str = "bf16"
    teacher: str = "auto"  # auto: CLIP ViT-H/14 (random weights) for the ViT sizes, pixels for digpt_tiny
    step: str = "pretrain"  # pretrain | finetune (timm's ViT with the encoder's shape, 1000 classes)
    overrides: list[str] = field(default_factory=list)
    config: str = ""  # the pretraining config this step is planned from, if any


def jax_python(explicit: str = "") -> str:
    """The interpreter that has jax[tpu]: ``--jax-python``, $DIGPT_JAX_PYTHON, or the repository's .venv-tpu."""
    path = explicit or os.environ.get("DIGPT_JAX_PYTHON", "") or str(REPO / ".venv-tpu/bin/python")
    if not os.access(path, os.X_OK):
        raise PlanError(
            f"no jax[tpu] interpreter at {path}: run `make tpu-env` (a separate .venv-tpu with jax[tpu], about "
            "1.3 GB), or point --jax-python / DIGPT_JAX_PYTHON at one"
        )
    return path


HEARTBEAT_SECONDS = 60.0


def _run_json(
    cmd: list[str], what: str, env: dict[str, str] | None = None, out_of_memory_hint: str = "", progress=None
) -> dict:
    """Run a child that answers with one JSON line. ``progress`` (a print-like callable) hears when it starts, every
    minute it runs, and when it ends. The child never outlives this call: an exception here (Ctrl-C, or SIGTERM
    turned into SystemExit by the tool) kills it before it propagates."""
    start = time.perf_counter()
    if progress:
        progress(f"  {what} ...")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=HEARTBEAT_SECONDS)
                break
            except subprocess.TimeoutExpired:
                if progress:
                    progress(f"  {what}: {time.perf_counter() - start:.0f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if progress:
        progress(f"  {what}: done in {time.perf_counter() - start:.0f} s")
    returncode = proc.returncode
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        if returncode < 0:  # killed: SIGKILL is most often the kernel's out-of-memory killer
            hint = f" (out of host memory? {out_of_memory_hint})" if returncode == -9 and out_of_memory_hint else ""
            raise PlanError(f"{what} was killed by signal {-returncode}{hint}") from None
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        raise PlanError(f"{what} failed (exit {returncode}): {tail}") from None
    if "error" in result:
        raise PlanError(f"{what}: {result['error']}")
    return result


def describe(topology: str, python: str) -> dict[str, Any]:
    """Devices, chip kind and per-device HBM of ``topology``, as libtpu reports them."""
    return _run_json([python, str(LIBTPU_SCRIPT), "describe", topology], f"libtpu ({topology})")


def check_model(name: str) -> None:
    """An unknown model name, one line before anything is traced."""
    from ..models import digpt_config

    try:
        digpt_config(name)
    except KeyError as e:
        raise PlanError(f"--model: {e.args[0]}") from None


def teacher_kind(request: PlanRequest) -> str:
    if request.teacher != "auto":
        return request.teacher
    from ..models import digpt_config

    return "clip" if digpt_config(request.model).teacher_dim == 1024 else "pixel"


def trace(request: PlanRequest, chip: dict[str, Any], workdir: Path, progress=None) -> dict[str, Any]:
    """The step for the chip's topology, traced (not compiled) on as many XLA:CPU devices into
    ``workdir/step.hlo.pb``; layout choices that depend on memory are made for the chip's HBM."""
    devices = chip["devices"]
    if request.step not in ("pretrain", "finetune"):
        raise PlanError(f"step {request.step!r}: plan pretrain or finetune")
    overrides = [
        f"model.name={request.model}",
        f"backend.fsdp={request.fsdp}",
        f"backend.precision={request.precision}",
        f"data.batch_size={request.batch}",
        *(
            [f"teacher.kind={teacher_kind(request)}", f"data.synthetic_size={request.batch * devices}"]
            if request.step == "pretrain"  # one global batch of synthetic images, the one traced
            else ["finetune.num_classes=1000", "finetune.eval_every_epochs=0"]
        ),
        *request.overrides,
    ]
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices))
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    hbm = str(chip["hbm_bytes"])
    cmd = [sys.executable, "-m", "digpt_xla.tpu_plan.trace", str(workdir), request.step, hbm, *overrides]
    hint = "tracing holds a copy of the unsharded state per virtual device: plan fsdp=1 on one chip, e.g. v5e:1x1"
    what = f"tracing {request.model} for {devices} devices"
    return _run_json(cmd, what, env=env, out_of_memory_hint=hint, progress=progress)


def compile_for(topology: str, workdir: Path, python: str, progress=None) -> dict[str, Any]:
    out = workdir / "compiled.json"
    cmd = [python, str(LIBTPU_SCRIPT), "compile", topology, str(workdir)]
    hint = (
        "libtpu's compile of a large step can need more than 20 GiB of host memory (ViT-H/14 for v4): use a bigger host"
    )
    # An "error" in its answer raises.
    _run_json(cmd, f"libtpu's compile for {topology}", out_of_memory_hint=hint, progress=progress)
    return json.loads(out.read_text())


def plan_step(
    request: PlanRequest,
    python: str,
    chip: dict[str, Any] | None = None,
    workdir: Path | None = None,
    progress=None,
) -> dict[str, Any]:
    """Trace and compile one step; the plan's figures per device. ``workdir`` keeps the traced and compiled
    programs (``assemble`` can then be run on them again without compiling)."""
    check_model(request.model)
    chip = chip or describe(request.topology, python)
    devices = chip["devices"]
    problem = ParallelDims("xla-spmd", request.fsdp, devices, f"devices of {request.topology}").problem()
    if problem:
        raise PlanError(problem)
    with tempfile.TemporaryDirectory(prefix="digpt-tpu-plan-") as tmp:
        where = workdir or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        (where / "request.json").write_text(json.dumps(request.__dict__) + "\n")
        trace(request, chip, where, progress)
        compile_for(request.topology, where, python, progress)
        return assemble(where, chip)


def fsdp_minimum(traced: dict[str, Any]) -> dict[str, Any]:
    """The wire bytes per device per step that the layout itself needs: the student's weights gathered for forward
    and for backward in the compute dtype and its gradients reduce-scattered over the fsdp group in the compute
    dtype (autocast's weight-gradient matmul yields them so; torch_xla sums them across devices before they meet
    the fp32 parameter), each shard's gradient all-reduced over the data-parallel replicas, the teacher's weights
    gathered once in its compute dtype when it is sharded (nothing when it is replicated), the batch never."""
    f, n = traced["fsdp"], traced["devices"]
    d = n // f
    compute = _compute_bytes(traced["precision"])
    teacher = _compute_bytes(traced.get("teacher_precision") or traced["precision"])
    params, teacher_params = traced["trainable_params"], traced.get("teacher_params", 0)
    parts = {
        "student weights gathered, forward and backward": 2 * (f - 1) / f * params * compute,
        "student gradients reduce-scattered": (f - 1) / f * params * compute,
        "gradient shards all-reduced over data replicas": 2 * (d - 1) / d * params / f * compute,
        "teacher weights gathered once": (f - 1) / f * teacher_params * teacher if traced.get("teacher_sharded") else 0,
    }
    return {"bytes": int(sum(parts.values())), "parts": {k: int(v) for k, v in parts.items()}}


def _compute_bytes(precision: str) -> int:
    """Bytes of a value in a precision's compute dtype: 2 under bf16/fp16 autocast, else fp32's 4."""
    return 2 if PRECISIONS.get(precision) else 4


def assemble(workdir: Path, chip: dict[str, Any]) -> dict[str, Any]:
    """The plan of a traced and compiled step (``trace.json``, ``compiled.json``, ``compiled.hlo.txt`` in
    ``workdir``): memory and its verdict, collectives against the FSDP minimum, FLOPs with loops counted, the
    estimate's range."""
    request = PlanRequest(**json.loads((workdir / "request.json").read_text()))
    traced = json.loads((workdir / "trace.json").read_text())
    compiled = json.loads((workdir / "compiled.json").read_text())
    prefix = "finetune_" if request.step == "finetune" else ""
    plan: dict[str, Any] = {
        "name": f"{prefix}{request.model}_fsdp{request.fsdp}_b{request.batch}",
        "topology": request.topology,
        "chips": chips_in(request.topology),
        **{k: compiled[k] for k in ("devices", "device_kind", "jax", "jaxlib", "libtpu", "compile_seconds")},
        **{k: compiled[k] for k in ("compile_cpu_seconds",) if k in compiled},  # plans made before it lack it
        **read_compile_log(workdir),
        **traced,
        "hbm_bytes": compiled.get("hbm_bytes", chip.get("hbm_bytes")),
        "compiled": compiled["compiled"],
    }
    if request.config:
        plan["config"] = request.config
    hbm = plan["hbm_bytes"]
    if not compiled["compiled"]:
        # libtpu's "needs X" is where its buffer assignment gave up: a lower bound on the whole need.
        return plan | {"fits": False, "fit_decided_by": "libtpu", "needed_bytes": compiled["needed_bytes"]}
    program = analyse((workdir / "compiled.hlo.txt").read_text(), compiled["devices"])
    unaliased = compiled["output_bytes"] - compiled["alias_bytes"]
    total = compiled["argument_bytes"] + compiled["temp_bytes"] + unaliased
    peak = compiled["peak_bytes"]
    need = max(total, peak)
    minimum = fsdp_minimum(traced)
    totals = program["collectives"]["totals"]
    wire = sum(t["wire_bytes"] for t in totals.values())
    plan |= {
        "argument_bytes": compiled["argument_bytes"],
        "argument_logical_bytes": program["argument_logical_bytes"],
        "output_bytes": compiled["output_bytes"],
        "alias_bytes": compiled["alias_bytes"],
        "temp_bytes": compiled["temp_bytes"],
        "unaliased_output_bytes": unaliased,
        "total_bytes": total,  # arguments + temporaries + outputs not written into a donated argument
        "peak_bytes": peak,  # libtpu's own peak of the program's live buffers
        "needed_bytes": need,
        # libtpu compiled it; it fits only when neither the sum nor the peak passes the HBM.
        "fits": need <= hbm,
        "fit_decided_by": "peak" if peak >= total else "sum",
        "headroom_bytes": hbm - need,
        "flops": program["flops"],
        "flops_per_image": program["flops"] / plan["per_device_batch"],
        "flops_vs_analytic": (
            program["flops"] / plan["per_device_batch"] / traced["analytic_flops_per_image"]
            if traced.get("analytic_flops_per_image")
            else None
        ),
        "cost_analysis_flops": compiled["cost_analysis_flops"],  # a loop body counted once
        "cost_analysis_bytes_accessed": compiled["cost_analysis_bytes_accessed"],
        "loops": program["loops"],
        "loops_with_unknown_trip_count": program["loops_with_unknown_trip_count"],
        "collectives": totals,
        "largest_collectives": program["collectives"]["largest"],
        "wire_bytes": wire,
        "wire_formula": WIRE_FORMULA,
        "fsdp_minimum": minimum,
        "wire_over_minimum": wire / minimum["bytes"] if minimum["bytes"] else None,
    }
    plan["estimate"] = estimate(plan, request.topology)
    return plan


MAX_BATCH_COMPILES = 8  # a ViT-H/14 compile is 6 to 20 minutes on 2 cores


def search_ended(fit: int, miss: int | None, headroom: float, slope: float, compiles: int) -> str:
    """Why the search for the largest batch may stop at ``fit`` (the largest batch that fits; ``miss`` the smallest
    above it that does not), or "" to go on. Near the limit memory is not monotonic in the batch (libtpu's figures
    for neighbouring batches differ unevenly), so a bracket, or HBM left, within 1/16 of the batch is close enough."""
    if miss == fit + 1:
        return "next batch does not fit"
    images = max(1, fit // 16)  # the search's resolution: 1/16 of the batch
    if headroom <= 0:  # the three figures add up to more than the HBM, and libtpu still passes it: at the limit
        return "no headroom by the figures"
    if headroom < slope * images:
        return "headroom under one image" if images == 1 else f"headroom under {images} images (1/16)"
    if miss is not None and miss - fit <= fit // 16:
        return f"{miss} does not fit"
    if compiles >= MAX_BATCH_COMPILES:
        return f"compile limit ({MAX_BATCH_COMPILES})" + (f": {miss} does not fit" if miss else "")
    return ""


def max_batch(request: PlanRequest, python: str, start: int = 8, progress=print) -> dict[str, Any]:
    """The largest per-device batch that fits, to within 1/16. Memory is about linear in the batch: compiles at 1
    and ``start`` give a line, and each next compile goes where the line through the largest fit says the HBM runs
    out, or halves the bracket between the largest fit and the smallest miss (``search_ended`` says when to stop).
    libtpu's "needs X" of a program that does not fit is where it gave up, less than the whole need, so a batch
    that does not fit only bounds the search from above."""
    chip = describe(request.topology, python)
    tried: dict[int, dict[str, Any]] = {}

    def attempt(batch: int) -> dict[str, Any]:
        if batch not in tried:
            t0 = time.perf_counter()
            try:
                tried[batch] = plan_step(_with_batch(request, batch), python, chip, progress=progress)
            except PlanError as e:  # keep what the earlier compiles found: each took minutes
                done = ", ".join(f"{b} {'fits' if p['fits'] else 'does not fit'}" for b, p in sorted(tried.items()))
                raise PlanError(f"at batch {batch}: {e}" + (f"; so far: {done}" if done else "")) from None
            fits = tried[batch]["fits"]
            progress(f"  batch {batch}: {'fits' if fits else 'does not fit'} ({time.perf_counter() - t0:.0f}s)")
        return tried[batch]

    def need(batch: int) -> int:
        plan = tried[batch]
        return plan["needed_bytes"]

    low = attempt(1)
    if not low["fits"]:
        raise PlanError(
            f"{request.model} does not fit {request.topology} at fsdp={request.fsdp} even at batch 1: needs "
            f"{need(1) / 2**30:.2f} GiB of {low['hbm_bytes'] / 2**30:.2f} GiB per device; raise --fsdp"
        )
    hbm = low["hbm_bytes"]
    attempt(max(start, 2))
    predicted: int | None = None  # the first batch the line chose, if the search went past --batch
    while True:
        fits = sorted(b for b, p in tried.items() if p["fits"])
        fit = fits[-1]
        miss = min((b for b, p in tried.items() if not p["fits"] and b > fit), default=None)
        # Bytes per image: from the largest fit back to one at least 10% smaller (TPU layouts make the step between
        # neighbouring batches uneven), or through the first miss when only batch 1 fits (--batch did not fit).
        a, b = (max(f for f in fits if f <= 0.9 * fit), fit) if len(fits) > 1 else (1, miss or start)
        slope = (need(b) - need(a)) / (b - a)
        headroom = hbm - need(fit)
        ended = search_ended(fit, miss, headroom, slope, len(tried))
        if ended:
            break
        candidate = fit + max(1, int(headroom / slope)) if slope > 0 else fit + 1
        if miss is not None:  # a line through a miss's understated need overshoots: halve the bracket instead
            candidate = min(candidate, miss - 1) if candidate < miss and len(fits) > 1 else (fit + miss) // 2
        predicted = candidate if predicted is None else predicted
        attempt(candidate)
    best = tried[fit]
    per_chip = best["devices"] / best["chips"]
    # Averaged from batch 1 to the largest fit: neighbouring batches differ too unevenly to report.
    per_image = (need(fit) - need(1)) / max(fit - 1, 1)
    return {
        "max_per_device_batch": fit,
        # The release's global batch at this per-device batch (no gradient accumulation).
        "chips_for_global_batch_4096": math.ceil(4096 / fit / per_chip),
        "settled_by": ended,
        "smallest_miss": miss,
        "headroom_bytes": headroom,
        "predicted": predicted,
        "bytes_per_sample": per_image,
        "fixed_bytes": need(1) - per_image,
        "compiles": {str(b): {"fits": p["fits"], "bytes": need(b)} for b, p in sorted(tried.items())},
        "compile_seconds_total": sum(p["compile_seconds"] for p in tried.values()),
        "plan": best,
    }


def _with_batch(request: PlanRequest, batch: int) -> PlanRequest:
    return PlanRequest(**{**request.__dict__, "batch": batch})
