"""What a compiled TPU program does per step, read from its optimized HLO text.

libtpu's cost analysis counts a ``while`` body once, and an async collective is compiled as a start fusion plus
continuation fusions that each carry a clone of it, so neither the cost analysis nor a count of text lines says
what a step runs. Here every computation gets the number of times one step executes it (loop bodies times their
trip count, found from the loop's counter: its start, its bound in the condition and its step in the body), each
collective is counted once per channel (its clones share the ``channel_id``) times the executions of its start (a
continuation clone may sit in a deeper loop, moving one piece of the collective per iteration), and FLOPs are
those of every ``dot`` and ``convolution`` times their computation's executions.

Bytes on the wire per device, for a group of n devices and the collective's full array A (Patarasuk and Yuan's
bandwidth-optimal ring algorithms): all-gather and reduce-scatter (n-1)/n * A, all-reduce 2(n-1)/n * A,
all-to-all (n-1)/n * A, collective-permute A (each device sends its buffer once).

libtpu compiles the SPMD partitioner's reduce-scatter (a weight gradient summed over the batch and kept split like
its weight) as an ``all-reduce`` of the full array inside a ``kind=kCustom`` fusion whose computation is named
``all-reduce-scatter``, with the slice of each device in the same fusion: it is counted as the reduce-scatter it
runs as. (jax's ``psum_scatter`` keeps the ``reduce-scatter`` op; a dot whose output sharding splits the summed
gradient, in jax as in torch_xla, compiles to the fusion.)
"""

from __future__ import annotations

import math
import re
from typing import Any

from .hlo_text import (
    Computation,
    Executions,
    Instruction,
    array_bytes,
    arrays,
    call_sites,
    executions,
    parse,
)

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
HOST_TRANSFERS = ("send", "recv", "infeed", "outfeed")
FUSED_REDUCE_SCATTER = "all-reduce-scatter"  # libtpu's name for the computation of a fused reduce-scatter
# libtpu's name for the computations of an async collective's continuations (between its start and its done)
ASYNC_CONTINUATION = "async_collective_fusion"
WIRE_FORMULA = {
    "all-gather": "(n-1)/n x full array",
    "reduce-scatter": "(n-1)/n x full array",
    "all-reduce": "2(n-1)/n x array",
    "all-to-all": "(n-1)/n x array",
    "collective-permute": "1 x array",
}
# Ops that pass a value on without computing with it: a collective's consumer is the first op that is not one.
_PLUMBING = {"tuple", "get-tuple-element", "bitcast", "copy", "custom-call", "reshape", "copy-start", "copy-done"}

_COLLECTIVE_OP = re.compile(r"^(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start|-done)?$")


def _top_level(shape: str) -> list[str]:
    """The elements of a tuple shape ``(a, (b, c), d)``; ``[shape]`` for an array."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(shape):
        depth += {"(": 1, ")": -1, "{": 1, "}": -1, "[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 1:
            parts.append(shape[start:i])
            start = i + 1
    parts.append(shape[start:-1])
    return [p.strip() for p in parts if p.strip()]


def _result_shape(shape: str, started: bool, kind: str) -> str:
    """What a collective delivers: the whole result of a synchronous one (every array of a combined collective);
    of an async all-gather or collective-permute start, its second element (the first is its operand, then come
    its sync flags); an async all-reduce start's shape is its result."""
    if started and kind in ("all-gather", "collective-permute", "all-to-all", "reduce-scatter"):
        parts = _top_level(shape)
        return parts[1] if len(parts) > 1 else shape
    return shape


def _group_size(inst: Instruction, devices: int) -> int:
    groups = inst.attribute("replica_groups")
    if groups is None or groups in ("{}", "{{}}"):
        return devices
    iota = re.match(r"\[(\d+),(\d+)\]<=", groups)
    if iota:
        return int(iota[2])
    first = re.match(r"\{\{([\d,]*)\}", groups)
    return len(first[1].split(",")) if first and first[1] else devices


def _parameter(comp: Computation, number: int) -> str | None:
    return next(
        (i.name for i in comp.instructions.values() if i.op == "parameter" and i.rest.startswith(f"{number})")), None
    )


def consumer(
    computations: dict[str, Computation], sites: dict[str, list[tuple[str, str]]], where: str, name: str
) -> str:
    """The first op that computes with a value, followed through plumbing, out of a fusion by its tuple index and
    into the fusions an async collective passes through: 'op (torch_xla op)'."""
    queue, seen = [(where, name)], set()
    while queue:
        cname, value = queue.pop(0)
        if (cname, value) in seen or cname not in computations:
            continue
        seen.add((cname, value))
        comp = computations[cname]
        if comp.instructions[value].root:  # leaves its computation whole
            queue += sites.get(cname, [])
        for user in comp.users(value):
            operands = user.operands()
            callee = computations.get((user.attribute("calls") or "").lstrip("%"))
            if user.op == "tuple" and user.root:  # one element of what the computation returns
                index = str(operands.index(value))
                for caller, site in sites.get(cname, []):
                    queue += [
                        (caller, g.name)
                        for g in computations[caller].users(site)
                        if g.op == "get-tuple-element" and g.attribute("index") == index
                    ]
            elif user.op in _PLUMBING or _COLLECTIVE_OP.match(user.op):
                queue.append((cname, user.name))
            elif (
                user.op == "fusion"
                and callee is not None
                and any(_COLLECTIVE_OP.match(i.op) for i in callee.instructions.values())
            ):  # an async collective's carrier: the value goes on inside it
                inner = _parameter(callee, operands.index(value))
                if inner is not None:
                    queue.append((callee.name, inner))
            else:
                op = user.op
                if callee is not None:
                    kinds = {i.op for i in callee.instructions.values()}
                    op = next((k for k in ("convolution", "dot", "reduce", "scatter") if k in kinds), "fusion")
                torch_op = re.search(r'op_name="([^"]+)"', user.rest)
                return f"{op} ({torch_op[1]})" if torch_op else op
    return ""


def collectives(computations: dict[str, Computation], runs: Executions, devices: int, top: int = 5) -> dict[str, Any]:
    """Each collective counted once per channel (its async clones share it), executed as often as its computation
    runs in a step; result and wire bytes per device per step; the largest by wire bytes."""
    found: dict[Any, dict[str, Any]] = {}
    pattern = "|".join(re.escape(k) for k in (*COLLECTIVES, *HOST_TRANSFERS))
    kinds = re.compile(rf"^({pattern})(-start)?$")
    for comp in computations.values():
        for inst in comp.instructions.values():
            match = kinds.match(inst.op)
            if match is None:
                continue
            fused = match[1] == "all-reduce" and comp.name.startswith(FUSED_REDUCE_SCATTER)
            kind = "reduce-scatter" if fused else match[1]
            channel = inst.attribute("channel_id")
            key: tuple = (kind, int(channel)) if channel is not None else (kind, comp.name, inst.name)
            if fused:  # libtpu numbers every fused reduce-scatter's all-reduce channel 1: one per fusion
                key = (kind, channel, comp.name.split(".clone")[0])
            result = _result_shape(inst.shape, started=bool(match[2]), kind=match[1])
            parts = arrays(result)
            size = array_bytes(result)
            if fused:  # its all-reduce holds the whole array; each device keeps 1/n
                size //= _group_size(inst, devices)
            entry = found.setdefault(key, {"kind": kind, "clones": 0, "executions": 0, "bytes": size, "rank": None})
            entry["clones"] += 1
            # A collective runs as often as its start (and done) do. Its continuations each move a piece of it
            # and may sit in a deeper loop: libtpu overlaps a block's next weight gather with a windowed matmul
            # loop of 4 iterations, one piece per iteration, all of one all-gather.
            rank = (not comp.name.startswith(ASYNC_CONTINUATION), runs.counts.get(comp.name, 0))
            if entry["rank"] is None or rank >= entry["rank"]:
                entry["rank"], entry["executions"] = rank, rank[1]
                big = max(parts, key=lambda a: math.prod(a[1]), default=("", []))
                entry |= {
                    "bytes": size,
                    "group": _group_size(inst, devices),
                    "shape": f"{big[0]}[{','.join(map(str, big[1]))}]",
                    "torch_op": (re.search(r'op_name="([^"]+)"', inst.rest) or [None, ""])[1],
                }
                entry["where"] = (comp.name, inst.name)
    totals: dict[str, dict[str, Any]] = {
        k: {"distinct": 0, "count": 0, "bytes": 0, "wire_bytes": 0} for k in (*COLLECTIVES, *HOST_TRANSFERS)
    }
    listed = []
    for entry in found.values():
        n = entry.get("group", devices)
        full = entry["bytes"] * (n if entry["kind"] == "reduce-scatter" else 1)  # a reduce-scatter's result is 1/n
        share = {
            "all-gather": (n - 1) / n,
            "reduce-scatter": (n - 1) / n,
            "all-reduce": 2 * (n - 1) / n,
            "all-to-all": (n - 1) / n,
        }.get(entry["kind"], 1.0)
        wire = full * share if n > 1 or entry["kind"] not in WIRE_FORMULA else 0.0
        entry["wire_bytes_per_execution"] = int(wire)
        t = totals[entry["kind"]]
        t["distinct"] += 1
        t["count"] += entry["executions"]
        t["bytes"] += entry["bytes"] * entry["executions"]
        t["wire_bytes"] += int(wire * entry["executions"])
        listed.append(entry)
    host_callbacks = sum(
        1
        for comp in computations.values()
        for inst in comp.instructions.values()
        if inst.op == "custom-call" and re.search(r'custom_call_target="[^"]*(?:callback|host)', inst.rest, re.I)
    )
    totals["host-callback"] = {"distinct": host_callbacks, "count": host_callbacks, "bytes": 0, "wire_bytes": 0}
    largest = sorted(listed, key=lambda e: -e["wire_bytes_per_execution"] * e["executions"])[:top]
    sites = call_sites(computations)
    for entry in largest:  # the consumer is followed through fusions: only for the collectives that are shown
        entry["consumer"] = consumer(computations, sites, *entry["where"]) if "where" in entry else ""
    return {
        "totals": totals,
        "largest": [
            {
                k: e.get(k)
                for k in ("kind", "shape", "group", "executions", "wire_bytes_per_execution", "consumer", "torch_op")
            }
            for e in largest
        ],
    }


def _flops(inst: Instruction, comp: Computation) -> int:
    out = arrays(inst.shape)
    if not out:
        return 0
    out_elements = math.prod(out[0][1])
    operands = inst.operands()
    shapes = [arrays(comp.instructions[o].shape) if o in comp.instructions else [] for o in operands[:2]]
    if inst.op == "dot":
        dims = inst.attribute("lhs_contracting_dims")
        if not shapes[0] or dims is None:
            return 0
        lhs = shapes[0][0][1]
        contracted = math.prod(lhs[int(d)] for d in re.findall(r"\d+", dims))
        return 2 * out_elements * contracted
    labels = inst.attribute("dim_labels")
    if len(shapes) < 2 or not shapes[0] or not shapes[1] or labels is None or "->" not in labels:
        return 0
    (lhs_labels, kernel_labels), out_labels = labels.split("->")[0].split("_"), labels.split("->")[1]
    lhs, kernel, result = shapes[0][0][1], shapes[1][0][1], out[0][1]
    if not (len(lhs_labels) == len(lhs) and len(kernel_labels) == len(kernel) and len(out_labels) == len(result)):
        return 0
    window = _window(inst.rest, sum(c.isdigit() for c in kernel_labels))
    valid = 1
    for d, spatial in enumerate(sorted(c for c in kernel_labels if c.isdigit())):
        size, stride, pad_low, base, dilation = (w[d] for w in window)
        valid *= _window_hits(
            result[out_labels.index(spatial)],
            kernel[kernel_labels.index(spatial)],
            lhs[lhs_labels.index(spatial)],
            stride,
            pad_low,
            base,
            dilation,
        )
    # Each output (batch, feature) sums, over the window positions that land on an input element (not on padding or
    # a hole of base dilation), the kernel's input features: XLA's own way of counting a convolution.
    batch, features = result[out_labels.index("b")], result[out_labels.index("f")]
    return 2 * batch * features * valid * kernel[kernel_labels.index("i")]


def _window(rest: str, dims: int) -> list[list[int]]:
    """size, stride, low padding, base (lhs) dilation and window (rhs) dilation of each spatial dimension."""
    match = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(re.findall(r"(\w+)=(\S+)", match[1])) if match else {}

    def per_dim(key: str, default: int, low_of_pair: bool = False) -> list[int]:
        if key not in fields:
            return [default] * dims
        parts = fields[key].split("x")
        return [int(p.split("_")[0]) if low_of_pair else int(p) for p in parts]

    sizes = per_dim("size", 1)
    return [sizes, per_dim("stride", 1), per_dim("pad", 0, True), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)]


_HITS: dict[tuple[int, ...], int] = {}


def _window_hits(out: int, size: int, length: int, stride: int, pad_low: int, base: int, dilation: int) -> int:
    """(output position, window position) pairs of one dimension whose input index is a real input element."""
    key = (out, size, length, stride, pad_low, base, dilation)
    if key not in _HITS:
        last = (length - 1) * base
        hits = 0
        for o in range(out):
            for k in range(size):
                index = o * stride + k * dilation - pad_low
                hits += 0 <= index <= last and index % base == 0
        _HITS[key] = hits
    return _HITS[key]


def matmul_flops(computations: dict[str, Computation], runs: Executions) -> int:
    """FLOPs of every dot and convolution, times the executions of the computation that holds it."""
    total = 0
    for comp in computations.values():
        times = runs.counts.get(comp.name, 0)
        if not times:
            continue
        for inst in comp.instructions.values():
            if inst.op in ("dot", "convolution"):
                total += _flops(inst, comp) * times
    return total


def analyse(text: str, devices: int) -> dict[str, Any]:
    """FLOPs, collectives and loops of one device's compiled step (``text``: the optimized HLO module)."""
    computations = parse(text)
    runs = executions(computations)
    entry = next((c for c in computations.values() if c.entry), None)
    parameters = [i for i in entry.instructions.values() if i.op == "parameter"] if entry else []
    return {
        "argument_logical_bytes": sum(array_bytes(i.shape) for i in parameters),  # before TPU tile padding
        "flops": matmul_flops(computations, runs),
        "collectives": collectives(computations, runs, devices),
        "loops": runs.loops,
        "loops_with_unknown_trip_count": sum(1 for loop in runs.loops if loop["trip_count"] is None),
    }
