"""Compile a traced training step for a TPU topology with libtpu, on a machine without a TPU.

Runs under the interpreter that has ``jax[tpu]`` (never in a process that imported torch_xla: both bring their own
XLA), as a script: it imports only the standard library and jax. Commands, each printing one JSON object:

    describe TOPOLOGY                          devices, chip kind, the HBM libtpu allows a program on one chip
    compile TOPOLOGY WORKDIR                   WORKDIR/step.hlo.pb -> compiled.json + compiled.hlo.txt

``compile`` donates exactly what torch_xla donates: ``WORKDIR/donors.json`` lists (parameter, result) pairs, the
state the step writes back found by tensor identity when it was traced. It writes libtpu's memory statistics (its
peak included) and cost analysis to ``compiled.json`` and the optimized program's text to ``compiled.hlo.txt``,
which ``hlo_program`` reads (collectives by channel, loops by trip count, FLOPs). libtpu keeps its own log of the
compile in ``WORKDIR/libtpu_logs`` (``libtpu_log`` reads the stages' durations from it). With ``DIGPT_LIBTPU_DUMP=DIR``
libtpu also writes its dumps there (buffer assignment, live ranges with the buffers live at its peak). A program
that needs more HBM than the chip has is reported (``fits: false`` with the bytes it needs), not raised.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

# Compile-only: no chip is opened, so several plans (and a test run beside a long compile) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import numpy as np  # noqa: E402

# libtpu words an HBM overflow two ways: "the total memory required ... exceeds available HBM (15.75G)" when
# buffer assignment fails, "Used 15.88G of 15.75G hbm" when a later pass runs out.
_OOM = (
    re.compile(r"total memory required.*?([\d.]+)([KMGT]?)i?B?\b.*?exceeds available HBM.*?\(([\d.]+)([KMGT]?)", re.S),
    re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm"),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def topology(name: str) -> Any:
    from jax.experimental import topologies

    # A v4 chip's two TensorCores run as one device (megacore) under the TPU runtime, so jax and torch_xla see one
    # device per chip with the chip's whole HBM; libtpu's compile-only topology splits them unless told.
    chip_config = {"chip_config_name": "megacore"} if name.startswith("v4:") else {}
    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu", **chip_config)
    except Exception as e:  # libtpu's own words name what it accepts
        error = e
    dims = name.partition(":")[2].split("x")
    if "chips_per_host_bounds" in str(error) and all(d.isdigit() for d in dims):
        # A slice smaller than one host's default 2x2 chips (v5e:1x1, v4:1x1x1): one host holds all of it.
        bounds = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
        try:
            return topologies.get_topology_desc(
                topology_name=name, platform="tpu", chips_per_host_bounds=bounds, **chip_config
            )
        except Exception as e:
            error = e
    print(json.dumps({"error": f"topology {name!r}: {str(error).splitlines()[0]}"}))
    sys.exit(2)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("jax", "jaxlib", "libtpu")}


def compile_options(devices: list) -> Any:
    from jax._src import compiler

    options = compiler.get_compile_options(
        num_replicas=1, num_partitions=len(devices), device_assignment=np.arange(len(devices)).reshape(1, -1)
    )
    build = options.executable_build_options
    build.use_shardy_partitioner = False  # torch_xla writes GSPMD shardings
    build.allow_spmd_sharding_propagation_to_output = [True]  # as torch_xla compiles an SPMD step
    dump = os.environ.get("DIGPT_LIBTPU_DUMP")
    if dump:
        debug = build.debug_options
        debug.xla_dump_to, debug.xla_dump_hlo_as_text, debug.xla_dump_hlo_pass_re = dump, True, ""
    return options


def _compile(module_text_or_proto: bytes | str, devices: list, donors: list[tuple[int, int]]) -> Any:
    from jax._src.interpreters import mlir
    from jax._src.lib import _jax
    from jax._src.lib import xla_client as xc
    from jax._src.lib.mlir import ir

    text = (
        xc._xla.mlir.hlo_to_stablehlo(module_text_or_proto)
        if isinstance(module_text_or_proto, bytes)
        else module_text_or_proto
    )
    with mlir.make_ir_context():
        module = ir.Module.parse(text)
        donate(module, donors)
        try:
            executable = devices[0].client.compile(
                module, executable_devices=xc.DeviceList(tuple(devices)), compile_options=compile_options(devices)
            )
        except _jax.JaxRuntimeError as e:
            raise CompileError(str(e)) from None
    return executable


class CompileError(Exception):
    pass


def donate(module: Any, donors: list[tuple[int, int]]) -> None:
    """Mark parameter p of ``main`` as the buffer its result r is written into, for each (p, r) in ``donors``."""
    from jax._src.lib.mlir import ir

    if not donors:
        return
    main = next(op for op in module.body.operations if ir.StringAttr(op.attributes["sym_name"]).value == "main")
    ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
    empty = ir.DictAttr.get({})
    args = list(main.attributes["arg_attrs"]) if "arg_attrs" in main.attributes else [empty] * len(ftype.inputs)
    i32 = ir.IntegerType.get_signless(32)
    for param, result in donors:
        if str(ftype.inputs[param]) != str(ftype.results[result]):  # torch_xla would not alias these either
            raise CompileError(f"donor parameter {param} ({ftype.inputs[param]}) is not result {result}'s type")
        attrs = {a.name: a.attr for a in ir.DictAttr(args[param])}
        attrs["tf.aliasing_output"] = ir.IntegerAttr.get(i32, result)
        args[param] = ir.DictAttr.get(attrs)
    main.attributes["arg_attrs"] = ir.ArrayAttr.get(args)


def hbm_bytes(devices: list) -> int | None:
    """The HBM libtpu lets one program use on this chip, read from its own refusal of a program that cannot fit."""
    program = """
    func.func public @main(%x: tensor<1099511627776xi8>) -> tensor<1099511627776xi8> {
      return %x : tensor<1099511627776xi8>
    }"""
    try:
        _compile(program, devices[:1], donors=[])
    except CompileError as e:
        needed = out_of_memory(str(e))
        return needed[1] if needed else None
    return None


def out_of_memory(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from libtpu's RESOURCE_EXHAUSTED message, or None for another error."""
    match = next((m for m in (pattern.search(message) for pattern in _OOM) if m), None)
    if match is None:
        return None
    need = float(match[1]) * _UNITS[match[2]]
    have = float(match[3]) * _UNITS[match[4]]
    return int(need), int(have)


def describe(name: str) -> dict[str, Any]:
    devices = topology(name).devices
    return {
        "topology": name,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "hbm_bytes": hbm_bytes(devices),
        **versions(),
    }


def compile_step(name: str, workdir: str) -> dict[str, Any]:
    devices = topology(name).devices
    with open(os.path.join(workdir, "step.hlo.pb"), "rb") as f:
        proto = f.read()
    with open(os.path.join(workdir, "donors.json")) as f:
        donors = [(int(p), int(r)) for p, r in json.load(f)]
    result: dict[str, Any] = {"topology": name, "devices": len(devices), "device_kind": devices[0].device_kind}
    result |= versions()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        executable = _compile(proto, devices, donors)
    except CompileError as e:
        result["compile_seconds"] = round(time.perf_counter() - start, 1)
        result["compile_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
        needed = out_of_memory(str(e))
        if needed is None:
            result["error"] = str(e).strip().splitlines()[0][:500]
            return result
        result |= {"compiled": False, "needed_bytes": needed[0], "hbm_bytes": needed[1]}
        return result
    result["compile_seconds"] = round(time.perf_counter() - start, 1)
    # The CPU time of all libtpu's threads: steadier than the wall clock on a shared host, where the same program
    # compiled twice in one session took 110.7 and 119.4 s.
    result["compile_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    stats = executable.get_compiled_memory_stats()
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    with open(os.path.join(workdir, "compiled.hlo.txt"), "w") as f:
        for module in executable.hlo_modules():
            f.write(module.to_string())
            f.write("\n")
    result |= {
        "compiled": True,
        "donated_buffers": len(donors),
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "peak_bytes": stats.peak_memory_in_bytes,
        "generated_code_bytes": stats.generated_code_size_in_bytes,
        # XLA's cost analysis counts a loop body once; hlo_program applies trip counts to FLOPs and collectives.
        "cost_analysis_flops": float(cost.get("flops", 0.0)),
        "cost_analysis_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    }
    return result


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "describe":
        print(json.dumps(describe(argv[1])))
        return 0
    if len(argv) == 3 and argv[0] == "compile":
        # Read when libtpu starts (libtpu_log.LOG_DIR); it writes its INFO log out by the time this process exits.
        os.environ["TPU_LOG_DIR"] = os.path.join(argv[2], "libtpu_logs")
        result = compile_step(argv[1], argv[2])
        with open(os.path.join(argv[2], "compiled.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
