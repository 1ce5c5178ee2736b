"""Where this checkout lives: config lookup relative to the repository and the git revision runs record."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def find_config(path: str | Path) -> Path:
    """A config path as given, or relative to the repository (so ``digpt demo`` works from any directory)."""
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.is_file() else candidate


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
