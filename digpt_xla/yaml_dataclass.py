"""YAML into nested dataclasses, with ``a.b=value`` overrides from the command line.

Unknown keys and values of the wrong type fail with a message naming the key, the value, the expected type and the
closest valid keys. A dataclass may list the allowed values of a field in a ``CHOICES`` class attribute.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value that does not fit the schema."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check (and where lossless, convert) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: value {value!r} is a {type(value).__name__}, expected {_type_name(tp)}")


def merge_values(obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"closest: {', '.join(prefix + c for c in close)}" if close else f"valid: {', '.join(names)}"
            raise ConfigError(f"unknown config key {key!r} ({hint})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: is a section, expected a mapping, got {value!r}")
            merge_values(current, value, f"{key}.")
            continue
        value = _convert(value, hints[name], key)
        choices = getattr(type(obj), "CHOICES", {}).get(name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        setattr(obj, name, value)


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> {"a": {"b": value}}; the value is parsed as YAML (numbers, lists, null, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    nested: dict[str, Any] = {}
    node = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


T = typing.TypeVar("T")


def load_dataclass(root: T, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Fill the dataclass ``root`` from a YAML file (if any), then each ``a.b=value`` override in order."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML text file (it is not UTF-8)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        try:
            merge_values(root, data, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        merge_values(root, parse_override(text), "")
    return root


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: YAML keeps the last silently, so a second
    ``model:`` section or ``name:`` would replace the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}YAML syntax error ({problem})"
