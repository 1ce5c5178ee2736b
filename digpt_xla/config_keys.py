"""Every config key with its value and a line of help, read from the comments beside the fields of ``config.py``
(one place: the comment that explains a field in the code is the help a user reads).

``digpt config --config FILE [overrides]`` prints the resolved config this way; ``docs/config.md`` holds the table
of every key and its default (``python -m digpt_xla.config_keys --update-docs``; a test keeps it current).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from . import config as config_module

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
TABLE_HEADER = "| key | default | meaning |"


def _comments(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment on the field's line, or else the comment lines right above it."""
    lines = source.splitlines()
    found: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            line = lines[item.lineno - 1]
            text = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            above: list[str] = []
            row = item.lineno - 2
            while not text and row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            found[(node.name, item.target.id)] = text or " ".join(above)
    return found


def keys(cfg: config_module.Config) -> list[tuple[str, Any, str]]:
    """(section.key, value, help) of every key of ``cfg``, in the order the config classes list them."""
    help_of = _comments(Path(config_module.__file__).read_text())
    rows = []
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        for f in dataclasses.fields(part):
            rows.append(
                (f"{section.name}.{f.name}", getattr(part, f.name), help_of.get((type(part).__name__, f.name), ""))
            )
    return rows


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else (value if value else '""')


def render(cfg: config_module.Config) -> str:
    """``key = value  # help`` lines, as ``digpt config`` prints them."""
    rows = keys(cfg)
    width = max(len(f"{k} = {_shown(v)}") for k, v, _ in rows)
    return "\n".join(f"{f'{k} = {_shown(v)}':{width}}  # {h or ''}".rstrip(" #") for k, v, h in rows)


def markdown_table() -> str:
    rows = [TABLE_HEADER, "|---|---|---|"]
    for key, value, help_ in keys(config_module.Config()):
        rows.append(f"| `{key}` | `{_shown(value)}` | {(help_ or '').replace('|', '/')} |")
    return "\n".join(rows)


def updated_doc(text: str) -> str:
    """``text`` (docs/config.md) with its key table rendered afresh."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join(lines[:start]) + markdown_table() + "\n" + "".join(lines[end:])


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-docs"]:
        DOC.write_text(updated_doc(DOC.read_text()))
        print(f"{DOC}: updated")
    else:
        print(markdown_table())
