"""The training step compiled for a TPU topology by libtpu (jax[tpu] in its own interpreter, `make tpu-env`)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PYTHON, REPO, subprocess_env
from digpt_xla.tpu_plan.chips import chips_in, estimate
from digpt_xla.tpu_plan.plan import PlanRequest, describe, jax_python, plan_step
from digpt_xla.tpu_plan.tables import markdown, replace_table, updated_docs

JAX_PYTHON = os.environ.get("DIGPT_JAX_PYTHON", str(REPO / ".venv-tpu/bin/python"))
needs_libtpu = pytest.mark.skipif(not os.access(JAX_PYTHON, os.X_OK), reason="no jax[tpu] interpreter (make tpu-env)")
TOPOLOGY = "v5e:2x2"


def tool(*args: str, tmp_path) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "tools/tpu_plan.py", "--out", str(tmp_path), *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)


@needs_libtpu
@pytest.mark.parametrize("fsdp", [1, 4])
def test_the_tiny_step_compiles_for_a_v5e_slice_with_its_state_donated_and_no_host_transfer(fsdp):
    plan = plan_step(PlanRequest("digpt_tiny", TOPOLOGY, fsdp=fsdp, batch=8), jax_python())
    assert plan["fits"] and plan["device_kind"] == "TPU v5 lite" and plan["devices"] == 4
    # Nothing leaves the device inside the step.
    for kind in ("send", "recv", "infeed", "outfeed", "host-callback"):
        assert plan["collectives"][kind]["count"] == 0, (kind, plan["collectives"])
    # One device's arguments are its share of the training state (split fsdp ways, whole otherwise), the teacher
    # and its slice of the batch, before the TPU's tile padding: a few KiB of constants (masks, lr) on top.
    expected = plan["state_bytes"] + plan["teacher_bytes"] + plan["batch_bytes"]
    assert expected <= plan["argument_logical_bytes"] <= expected * 1.01 + 64 * 1024, plan
    # The updated parameters and moments are written in place: outputs beyond them are a few scalars.
    assert plan["aliased_results"] > 0 and plan["unaliased_output_bytes"] <= 64 * 1024, plan
    assert plan["total_bytes"] == plan["argument_bytes"] + plan["temp_bytes"] + plan["unaliased_output_bytes"]
    if fsdp == 4:
        assert plan["collectives"]["all-gather"]["count"] > 0  # FSDPv2 gathers each block's weights where it runs
    assert 0 < plan["estimate"]["mfu"] <= 1 and plan["estimate"]["step_seconds"] > 0


@needs_libtpu
def test_a_step_that_cannot_fit_is_reported_with_what_it_needs(tmp_path):
    # 512 px images on the tiny model: 16k tokens a sample, attention alone outgrows a 16 GB chip.
    proc = tool(
        "--model",
        "digpt_tiny",
        "--topology",
        TOPOLOGY,
        "--fsdp",
        "4",
        "--batch",
        "2",
        "model.img_size=512",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "does not fit: needs" in proc.stdout and "of 15.75 GiB per device" in proc.stdout, proc.stdout
    saved = json.loads(next(tmp_path.glob("v5e_2x2/*.json")).read_text())
    assert saved["fits"] is False and saved["needed_bytes"] > saved["hbm_bytes"] > 15 * 2**30
    assert saved["topology"] == TOPOLOGY and saved["device_kind"] == "TPU v5 lite"


@needs_libtpu
@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology", "v9z:2x2"], "topology 'v9z:2x2'"),
        (["--topology", TOPOLOGY, "--fsdp", "3"], "fsdp"),
        pytest.param(  # a compile of its own (about a minute): in make test-slow
            ["--topology", TOPOLOGY, "--fsdp", "4", "--max-batch", "model.img_size=512"],
            "even at batch 1",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["unknown topology", "fsdp does not divide the devices", "too big at batch 1"],
)
def test_plan_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    proc = tool("--model", "digpt_tiny", *args, tmp_path=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


@needs_libtpu
def test_a_single_chip_topology_is_accepted():
    # Smaller than one host's default 2x2 chips: planned as one host holding the whole slice. fsdp=1 plans go there,
    # since tracing holds one copy of the unsharded state per virtual device.
    assert describe("v5e:1x1", jax_python())["devices"] == 1
    assert describe("v4:1x1x1", jax_python())["devices"] == 1  # v4: one megacore device per chip, as on a TPU VM


def test_the_estimate_is_a_roofline_of_the_compiled_cost():
    compiled = {
        "device_kind": "TPU v5 lite",
        "devices": 4,
        "fits": True,
        "flops": 197e12 * 0.1,  # 100 ms of compute at peak
        "bytes_accessed": 819e9 * 0.05,  # 50 ms of HBM traffic
        "collectives": {"all-gather": {"count": 1, "bytes": 200e9 * 0.02}},  # 20 ms over ICI
    }
    est = estimate(compiled, "v5e:2x2")
    assert est["step_seconds"] == pytest.approx(0.12) and est["mfu"] == pytest.approx(0.1 / 0.12)
    assert chips_in("v4:2x2x1") == 4 and estimate(compiled | {"device_kind": "TPU v99"}, "v5e:2x2") is None


def test_a_missing_jax_interpreter_is_named(tmp_path):
    proc = tool(
        "--model", "digpt_tiny", "--topology", TOPOLOGY, "--jax-python", str(tmp_path / "none"), tmp_path=tmp_path
    )
    assert proc.returncode == 2 and "make tpu-env" in proc.stderr, proc.stderr


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("size", ["small", "base", "large", "huge"])
def test_every_published_student_step_compiles_for_v5e(size):
    """The S/B/L/H pretraining steps (CLIP ViT-H/14 teacher, bf16, fsdp 4 on a v5e 2x2): each compiles, fits, and
    holds its sharded state, teacher and batch as arguments (minutes to tens of minutes each on 2 cores)."""
    model = {"huge": "digpt_vit_huge_patch14_224"}.get(size, f"digpt_vit_{size}_patch16_224")
    plan = plan_step(PlanRequest(model, TOPOLOGY, fsdp=4, batch=8), jax_python())
    assert plan["fits"], plan
    expected = plan["state_bytes"] + plan["teacher_bytes"] + plan["batch_bytes"]
    assert expected <= plan["argument_logical_bytes"] <= expected * 1.01 + (1 << 20), plan
    assert plan["unaliased_output_bytes"] <= 1 << 20 and plan["collectives"]["send"]["count"] == 0, plan


def test_committed_plans_render_as_the_docs_tables(tmp_path):
    plans = sorted((REPO / "bench").glob("v5e_*/*.json"))
    memory = markdown(plans, "memory").splitlines()
    # ViT-H/14 at fsdp=16 on a v5e-16, beside XLA:CPU's buffer assignment of the same step (bench/cpu-*).
    huge = next(row for row in memory if row.startswith("| H/14 | 16 | v5e:4x4 | 8 |"))
    cells = [c.strip() for c in huge.strip("|").split("|")]
    tpu, cpu, ratio = float(cells[6].strip("*")), float(cells[8]), float(cells[9])
    assert cells[7] == "yes" and ratio == pytest.approx(tpu / cpu, abs=0.01) and tpu < cpu
    assert all("max_batch" not in row for row in memory)
    largest = markdown(plans, "max-batch").splitlines()
    assert any(row.startswith("| H/14 | TPU v5 lite | v5e:4x4 | 16 | 25 | 1 | 25 |") for row in largest), largest
    # A file that is not a plan is named, one line, exit 2.
    (tmp_path / "other.json").write_text("{}")
    proc = tool("--markdown", str(tmp_path / "other.json"), "--table", "memory", tmp_path=tmp_path)
    assert proc.returncode == 2 and "other.json: not a TPU plan" in proc.stderr, proc.stderr


def test_the_docs_tables_are_the_committed_plans():
    # A plan committed without `make tpu-tables` (or a table edited by hand) leaves the docs stale.
    for path, text in updated_docs(REPO).items():
        assert path.read_text() == text, f"{path.name} differs from bench/v*/*.json: run `make tpu-tables`"
    table = "| a | b | c | d |\n|---|---|---|---|\n| 1 | 2 | 3 | 4 |"
    assert replace_table("x\n| a | b | c |\n|---|\n| 0 | 0 | 0 |\ny\n", table, "doc") == f"x\n{table}\ny\n"
    with pytest.raises(ValueError, match="doc: 0 tables headed"):
        replace_table("no table here\n", table, "doc")


@pytest.mark.parametrize(
    "power, start", [(1.0, 64), (0.9, 20), (0.7, 300)], ids=["linear", "sublinear", "far above the largest"]
)
def test_max_batch_finds_the_largest_batch_that_fits(monkeypatch, power, start):
    # libtpu's "needs X" of a program that does not fit is where it gave up, less than its whole need, so a line
    # through such a point overshoots; and memory that grows slower than the line through batch 1 and --batch leaves
    # HBM free at the line's prediction. Either way the search must end within 1/16 below the largest batch that fits,
    # with less HBM left than those images need or a batch that does not fit above.
    from digpt_xla.tpu_plan import plan as tpu_plan

    hbm, fixed, per_image = 16 * 2**30, 2 * 2**30, 350 * 2**20

    def bytes_at(batch: int) -> int:
        return int(fixed + per_image * batch**power)

    def fake_plan(request, python, chip=None):
        need = bytes_at(request.batch)
        fits = need <= hbm
        plan = {"fits": fits, "hbm_bytes": hbm, "per_device_batch": request.batch, "devices": 4, "chips": 4}
        plan["compile_seconds"] = 1.0
        return plan | ({"total_bytes": need} if fits else {"needed_bytes": fixed + (need - fixed) * 4 // 5})

    largest = max(b for b in range(1, 1000) if bytes_at(b) <= hbm)  # 40, 61 and 201
    monkeypatch.setattr(tpu_plan, "describe", lambda topology, python: {"devices": 4})
    monkeypatch.setattr(tpu_plan, "plan_step", fake_plan)
    result = tpu_plan.max_batch(PlanRequest("m", "v5e:2x2"), "python", start=start, progress=lambda _: None)
    found, ended = result["max_per_device_batch"], result["settled_by"]
    assert len(result["compiles"]) <= tpu_plan.MAX_BATCH_COMPILES and result["predicted"] != largest, result
    assert largest - largest // 16 <= found <= largest, result
    if ended.startswith("headroom under"):
        images = max(1, found // 16)
        assert bytes_at(found + images) - bytes_at(found) > result["headroom_bytes"] >= 0, result
    else:
        assert ended == f"{result['smallest_miss']} does not fit" and largest < result["smallest_miss"], result


def test_a_killed_child_and_a_failed_search_keep_what_they_know(monkeypatch):
    from digpt_xla.tpu_plan import plan as tpu_plan

    suicide = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    with pytest.raises(tpu_plan.PlanError, match=r"killed by signal 9 \(out of host memory\? use a bigger host\)"):
        tpu_plan._run_json(suicide, "libtpu's compile", out_of_memory_hint="use a bigger host")

    def fake_plan(request, python, chip=None):
        if request.batch == 25:
            raise tpu_plan.PlanError("libtpu's compile for v4:2x2x4 was killed by signal 9")
        fits = request.batch < 40
        plan = {"fits": fits, "hbm_bytes": 2**34, "per_device_batch": request.batch, "compile_seconds": 1.0}
        return plan | ({"total_bytes": 2**30 * request.batch} if fits else {"needed_bytes": 2**34})

    monkeypatch.setattr(tpu_plan, "describe", lambda topology, python: {"devices": 16})
    monkeypatch.setattr(tpu_plan, "plan_step", fake_plan)
    with pytest.raises(tpu_plan.PlanError, match="at batch 25: .*killed by signal 9; so far: 1 fits, 50 does not fit"):
        tpu_plan.max_batch(PlanRequest("m", "v4:2x2x4"), "python", start=50, progress=lambda _: None)


@pytest.mark.parametrize(
    "message, need",
    [
        ("RESOURCE_EXHAUSTED: ... the total memory required 17.20G exceeds available HBM (15.75G) ...", 17.20),
        (
            "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Used 15.88G of 15.75G hbm. Exceeded hbm capacity by 137M.",
            15.88,
        ),
    ],
    ids=["buffer assignment", "a later pass"],
)
def test_both_of_libtpus_out_of_memory_messages_are_read(message, need):
    from digpt_xla.tpu_plan.libtpu_compile import out_of_memory

    assert out_of_memory(message) == (int(need * 2**30), int(15.75 * 2**30))
    assert out_of_memory("INVALID_ARGUMENT: something else") is None
