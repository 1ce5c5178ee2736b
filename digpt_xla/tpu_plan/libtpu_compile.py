"""Compile a traced training step for a TPU topology with libtpu, on a machine without a TPU.

Runs under the interpreter that has ``jax[tpu]`` (never in a process that imported torch_xla: both bring their own
XLA), as a script: it imports only the standard library and jax. Commands, each printing one JSON object:

    describe TOPOLOGY                      devices, chip kind, the HBM libtpu allows a program on one chip
    compile TOPOLOGY STEP.hlo.pb OUT.json  memory, cost analysis and collectives of the compiled step

``compile`` gives the step's updated state its place: every result aliases the first unused argument of the same
type, as torch_xla donates the parameters and AdamW moments that the step replaces. A program that needs more HBM
than the chip has is reported (``fits: false`` with the bytes it needs), not raised.
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

# fmt: off
_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}
# fmt: on
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
HOST_TRANSFERS = ("send", "recv", "infeed", "outfeed")
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
    return options


def _compile(module_text_or_proto: bytes | str, devices: list, alias_state: bool) -> tuple[Any, int]:
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
        aliased = alias_results_to_arguments(module) if alias_state else 0
        try:
            executable = devices[0].client.compile(
                module, executable_devices=xc.DeviceList(tuple(devices)), compile_options=compile_options(devices)
            )
        except _jax.JaxRuntimeError as e:
            raise CompileError(str(e)) from None
    return executable, aliased


class CompileError(Exception):
    pass


def alias_results_to_arguments(module: Any) -> int:
    """Mark each result of ``main`` as written into the first not yet used argument of its type (what torch_xla's
    buffer donation does for state updated in place); returns how many results were aliased."""
    from jax._src.lib.mlir import ir

    main = next(op for op in module.body.operations if ir.StringAttr(op.attributes["sym_name"]).value == "main")
    ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
    empty = ir.DictAttr.get({})
    args = list(main.attributes["arg_attrs"]) if "arg_attrs" in main.attributes else [empty] * len(ftype.inputs)
    free: dict[str, list[int]] = {}
    for j, t in enumerate(ftype.inputs):
        free.setdefault(str(t), []).append(j)
    i32, aliased = ir.IntegerType.get_signless(32), 0
    for i, t in enumerate(ftype.results):
        candidates = free.get(str(t))
        if not candidates:
            continue
        j = candidates.pop(0)
        attrs = {a.name: a.attr for a in ir.DictAttr(args[j])}
        attrs["tf.aliasing_output"] = ir.IntegerAttr.get(i32, i)
        args[j] = ir.DictAttr.get(attrs)
        aliased += 1
    main.attributes["arg_attrs"] = ir.ArrayAttr.get(args)
    return aliased


def hbm_bytes(devices: list) -> int | None:
    """The HBM libtpu lets one program use on this chip, read from its own refusal of a program that cannot fit."""
    program = """
    func.func public @main(%x: tensor<1099511627776xi8>) -> tensor<1099511627776xi8> {
      return %x : tensor<1099511627776xi8>
    }"""
    try:
        _compile(program, devices[:1], alias_state=False)
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


def array_bytes(shape_text: str) -> int:
    """Bytes of the arrays in an HLO shape (``bf16[8,3,32,32]{...}`` or a tuple of them)."""
    total = 0.0
    for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]", shape_text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return int(total)


def collective_inventory(hlo_text: str) -> dict[str, dict[str, int]]:
    """Count and result bytes of each collective and host transfer in an optimized HLO module. An asynchronous
    pair (``-start``/``-done``) counts once, by its ``-start``; its bytes are those of its largest array."""
    kinds = COLLECTIVES + HOST_TRANSFERS
    found = {k: {"count": 0, "bytes": 0} for k in kinds}
    pattern = re.compile(r"=\s+(.+?)\s+(" + "|".join(re.escape(k) for k in kinds) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        match = pattern.search(line)
        if match is None or f"{match[2]}-done(" in line:
            continue
        shape, kind, started = match[1], match[2], match[3]
        size = max((array_bytes(a) for a in re.findall(r"[a-z]+\d*\[[\d,]*\]", shape)), default=0)
        found[kind]["count"] += 1
        found[kind]["bytes"] += size if started else array_bytes(shape)
    host_callbacks = len(re.findall(r'custom_call_target="[^"]*(?:callback|Callback|host|Host)[^"]*"', hlo_text))
    found["host-callback"] = {"count": host_callbacks, "bytes": 0}
    return found


def entry_parameter_bytes(hlo_text: str) -> int:
    """Bytes of the entry computation's parameters as their shapes are written (before TPU tile padding)."""
    total = 0
    entry = hlo_text[hlo_text.index("\nENTRY") :] if "\nENTRY" in hlo_text else ""
    for line in entry.splitlines()[1:]:
        if line.startswith("}"):
            break
        match = re.search(r"=\s+([a-z]+\d*\[[\d,]*\])\S*\s+parameter\(", line)
        if match is not None:
            total += array_bytes(match[1])
    return total


def describe(name: str) -> dict[str, Any]:
    devices = topology(name).devices
    return {
        "topology": name,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "hbm_bytes": hbm_bytes(devices),
        **versions(),
    }


def compile_step(name: str, proto_path: str) -> dict[str, Any]:
    devices = topology(name).devices
    with open(proto_path, "rb") as f:
        proto = f.read()
    result: dict[str, Any] = {"topology": name, "devices": len(devices), "device_kind": devices[0].device_kind}
    result |= versions()
    start = time.perf_counter()
    try:
        executable, aliased = _compile(proto, devices, alias_state=True)
    except CompileError as e:
        result["compile_seconds"] = round(time.perf_counter() - start, 1)
        needed = out_of_memory(str(e))
        if needed is None:
            result["error"] = str(e).strip().splitlines()[0][:500]
            return result
        result |= {"fits": False, "needed_bytes": needed[0], "hbm_bytes": needed[1]}
        return result
    result["compile_seconds"] = round(time.perf_counter() - start, 1)
    stats = executable.get_compiled_memory_stats()
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    hlo = "\n".join(m.to_string() for m in executable.hlo_modules())
    result |= {
        "fits": True,
        "aliased_results": aliased,
        "argument_bytes": stats.argument_size_in_bytes,
        "argument_logical_bytes": entry_parameter_bytes(hlo),  # before TPU tile padding
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "generated_code_bytes": stats.generated_code_size_in_bytes,
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "transcendentals": float(cost.get("transcendentals", 0.0)),
        "collectives": collective_inventory(hlo),
    }
    return result


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "describe":
        print(json.dumps(describe(argv[1])))
        return 0
    if len(argv) == 4 and argv[0] == "compile":
        result = compile_step(argv[1], argv[2])
        with open(argv[3], "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "collectives"}))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
