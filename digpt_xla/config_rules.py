"""The checks behind a config's range rules: a rule is (check, what is allowed); ``check_fields`` walks a nested
config dataclass and names the first key whose value breaks its rule, or whose URL cannot be opened here."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from .yaml_dataclass import ConfigError

Rule = tuple[Callable[[Any], bool], str | Callable[[], str]]  # (check, what is allowed)


def number_rule(
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
) -> Rule:
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        if not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    bounds = [
        f">{'' if lo_open else '='} {lo}" if lo is not None else "",
        f"<{'' if hi_open else '='} {hi}" if hi is not None else "",
    ]
    desc = "a finite number " + " and ".join(b for b in bounds if b)
    return ok, desc.rstrip() + (" (or null)" if optional else "")


def two_betas(v: Any) -> bool:
    return len(v) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in v)


def balanced_braces(spec: str) -> bool:
    for part in spec.split("::"):
        depth = 0
        for ch in part:
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth < 0:
                return False
        if depth:
            return False
    return True


def check_fields(obj: Any, rules: dict[tuple[type, str], Rule], prefix: str = "") -> None:
    """Every field of ``obj`` (recursing into nested dataclasses) against ``rules``, keyed by (class, field)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, rules, f"{key}.")
            continue
        rule = rules.get((type(obj), f.name))
        if rule is not None and not rule[0](value):
            allowed = rule[1]() if callable(rule[1]) else rule[1]
            raise ConfigError(f"{key}={value!r} is out of range: expected {allowed}")
        if isinstance(value, str) and "://" in value:
            check_url_protocols(key, value)


def check_url_protocols(key: str, value: str) -> None:
    """A URL whose filesystem cannot be opened here (gs:// without gcsfs) fails at load, naming the key."""
    from .filesystems import protocol_problem

    for part in value.split("::"):  # data.urls joins several specs with "::"
        problem = protocol_problem(part) if "://" in part else None
        if problem:
            raise ConfigError(f"{key}={value!r}: {problem}")
