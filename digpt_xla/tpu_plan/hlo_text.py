"""An optimized HLO module as text, read into computations and instructions, and how often one run of the entry
computation executes each of them (loop bodies times their trip count, found from the loop's counter: its start,
its bound in the condition and its step in the body; libtpu's compiled programs carry no trip count of their own).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

# fmt: off
DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}
# fmt: on

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def array_bytes(shape_text: str) -> int:
    """Bytes of the arrays in an HLO shape (``bf16[8,3,32,32]{...}`` or a tuple of them)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def arrays(shape_text: str) -> list[tuple[str, list[int]]]:
    return [(t, [int(d) for d in dims.split(",") if d]) for t, dims in _ARRAY.findall(shape_text) if t in DTYPE_BYTES]


@dataclass
class Instruction:
    name: str
    shape: str
    op: str
    rest: str  # operands and attributes, as written
    root: bool = False
    _operands: list[str] | None = field(default=None, repr=False)

    def operands(self) -> list[str]:
        if self._operands is None:
            self._operands = self._parse_operands()
        return self._operands

    def _parse_operands(self) -> list[str]:
        depth = 1
        for end, ch in enumerate(self.rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return re.findall(r"%([\w.\-]+)", self.rest[:end])
        return re.findall(r"%([\w.\-]+)", self.rest)

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=([^ ]+?)(?:, [a-z_]+=|$)", self.rest)
        return match[1] if match else None


@dataclass
class Computation:
    name: str
    entry: bool
    instructions: dict[str, Instruction] = field(default_factory=dict)
    _users: dict[str, list[Instruction]] | None = field(default=None, repr=False)

    def users(self, name: str) -> list[Instruction]:
        if self._users is None:
            self._users = defaultdict(list)
            for inst in self.instructions.values():
                for operand in dict.fromkeys(inst.operands()):
                    self._users[operand].append(inst)
        return self._users.get(name, [])

    @property
    def root(self) -> Instruction | None:
        return next((i for i in self.instructions.values() if i.root), None)


def parse(text: str) -> dict[str, Computation]:
    computations: dict[str, Computation] = {}
    current: Computation | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations[header[1]] = Computation(header[1], line.startswith("ENTRY"))
            continue
        if current is None:
            continue
        match = _INSTRUCTION.match(line)
        if match:
            current.instructions[match[2]] = Instruction(match[2], match[3], match[4], match[5], bool(match[1]))
    return computations


def _constant(comp: Computation, name: str, seen: int = 0) -> int | None:
    """The integer a scalar instruction holds, looking through copies, converts and one-operand fusions."""
    inst = comp.instructions.get(name)
    if inst is None or seen > 8:
        return None
    if inst.op == "constant":
        match = re.match(r"(-?\d+)\)", inst.rest)
        return int(match[1]) if match else None
    if inst.op in ("copy", "convert", "bitcast") and inst.operands():
        return _constant(comp, inst.operands()[0], seen + 1)
    return None


def _tuple_index(comp: Computation, name: str) -> int | None:
    """k when ``name`` is ``get-tuple-element(param), index=k`` of the computation's parameter (or a copy of it)."""
    inst = comp.instructions.get(name)
    for _ in range(8):  # layout copies between the element and its use
        if inst is None or inst.op not in ("copy", "bitcast") or not inst.operands():
            break
        inst = comp.instructions.get(inst.operands()[0])
    if inst is None or inst.op != "get-tuple-element":
        return None
    source = comp.instructions.get(inst.operands()[0]) if inst.operands() else None
    index = inst.attribute("index")
    return int(index) if source is not None and source.op == "parameter" and index is not None else None


def trip_count(computations: dict[str, Computation], caller: Computation, loop: Instruction) -> int | None:
    """Iterations of a counted ``while``: ``i < N`` (or ``N > i``, ``<=``, ``!=``) on tuple element k, k starting
    at a constant and stepped by a constant in the body. None when the loop is not of that form."""
    cond = computations.get((loop.attribute("condition") or "").lstrip("%"))
    body = computations.get((loop.attribute("body") or "").lstrip("%"))
    if cond is None or body is None or cond.root is None or body.root is None:
        return None
    compare = cond.root
    if compare.op in ("or", "and"):
        # A counter widened by libtpu into two u32 words (torch_xla counts in 64 bits): "high < 0 or (high == 0
        # and low < N)". The one comparison of a counter against a non-zero bound is the loop's.
        bounded = [
            i
            for i in cond.instructions.values()
            if i.op == "compare"
            and i.attribute("direction") in ("LT", "LE", "GT", "GE")
            and any(_constant(cond, o) for o in i.operands())
            and any(_tuple_index(cond, o) is not None for o in i.operands())
        ]
        if len(bounded) != 1:
            return None
        compare = bounded[0]
    if compare.op == "fusion":  # the comparison fused: read it inside, its operands are the fusion's parameters
        fused = computations.get((compare.attribute("calls") or "").lstrip("%"))
        if fused is None or fused.root is None or fused.root.op != "compare":
            return None
        params = {i.name: int(i.rest.split(")")[0]) for i in fused.instructions.values() if i.op == "parameter"}
        outer = compare.operands()
        operands = [outer[params[o]] if o in params else o for o in fused.root.operands()]
        constants = [_constant(fused, o) for o in fused.root.operands()]
        direction = fused.root.attribute("direction")
    elif compare.op == "compare":
        operands = compare.operands()
        constants = [_constant(cond, o) for o in operands]
        direction = compare.attribute("direction")
    else:
        return None
    if len(operands) != 2:
        return None
    flip = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE"}
    if constants[1] is not None and _tuple_index(cond, operands[0]) is not None:
        k, bound = _tuple_index(cond, operands[0]), constants[1]
    elif constants[0] is not None and _tuple_index(cond, operands[1]) is not None:
        k, bound, direction = _tuple_index(cond, operands[1]), constants[0], flip.get(direction or "", "")
    else:
        return None
    init_tuple = caller.instructions.get(loop.operands()[0]) if loop.operands() else None
    if init_tuple is None or init_tuple.op != "tuple" or k is None or k >= len(init_tuple.operands()):
        return None
    start = _constant(caller, init_tuple.operands()[k])
    body_root = body.root
    if start is None or body_root.op != "tuple" or k >= len(body_root.operands()):
        return None
    update = body.instructions.get(body_root.operands()[k])
    while update is not None and update.op in ("copy", "bitcast") and update.operands():  # layout plumbing
        update = body.instructions.get(update.operands()[0])
    if update is None or update.op not in ("add", "subtract") or len(update.operands()) != 2:
        return None
    a, b = update.operands()
    if _tuple_index(body, a) == k:
        step = _constant(body, b)
    elif update.op == "add" and _tuple_index(body, b) == k:
        step = _constant(body, a)
    else:
        return None
    if step is None:
        return None
    step = -step if update.op == "subtract" else step
    if not step:
        return None
    span = {"LT": bound - start, "LE": bound - start + 1, "GT": start - bound, "GE": start - bound + 1}.get(
        direction or "", (bound - start) if direction == "NE" else None
    )
    if span is None or (span > 0) != (step > 0 if direction in ("LT", "LE", "NE") else step < 0):
        return 0 if span is not None and span <= 0 else None
    return max(0, math.ceil(span / abs(step)))


@dataclass
class Executions:
    """How many times one step runs each computation, and the loops that decide it."""

    counts: dict[str, int]
    loops: list[dict[str, Any]]


def executions(computations: dict[str, Computation]) -> Executions:
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)  # callee -> [(caller, times per caller run)]
    loops = []
    for comp in computations.values():
        for inst in comp.instructions.values():
            trips = 1
            if inst.op == "while":
                found = trip_count(computations, comp, inst)
                loops.append({"loop": inst.name, "in": comp.name, "trip_count": found})
                trips = found if found is not None else 1
            for key, callee in _CALLEE.findall(inst.rest):
                times = trips if key == "body" else (trips + 1 if key == "condition" else 1)
                calls[callee].append((comp.name, times))
            for branches in _BRANCHES.findall(inst.rest):
                for callee in re.findall(r"%([\w.\-]+)", branches):
                    calls[callee].append((comp.name, 1))
    counts: dict[str, int] = {}

    def count(name: str, depth: int = 0) -> int:
        if name not in counts:
            comp = computations.get(name)
            if comp is not None and comp.entry:
                counts[name] = 1
            elif depth > 200:
                counts[name] = 0
            else:
                counts[name] = sum(count(caller, depth + 1) * times for caller, times in calls.get(name, ()))
        return counts[name]

    for name in computations:
        count(name)
    return Executions(counts, loops)


def call_sites(computations: dict[str, Computation]) -> dict[str, list[tuple[str, str]]]:
    """callee -> [(caller computation, calling instruction)]."""
    sites: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for comp in computations.values():
        for inst in comp.instructions.values():
            for _, callee in _CALLEE.findall(inst.rest):
                sites[callee].append((comp.name, inst.name))
    return sites
