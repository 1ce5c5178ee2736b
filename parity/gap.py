"""The gap ledger: downstream results per backend and numeric setting, beside the paper's reference rows, with a
t-test of each setting against a baseline so a difference is only called one when it exceeds the seed-to-seed
noise: paired over the seeds both sides ran (same seed, same initial weights and data order, so the seed's own
effect cancels), Welch's unpaired test where fewer than two seeds match.

One JSON object per line: backend, setting, seed, config_hash, git_revision, data, metric, value, time.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from digpt_xla.errors import UserError

# The published ImageNet-1K finetuning top-1 of D-iGPT ViT-B/16 (CLIP ViT-H/14 teacher).
PAPER_ROWS = (
    {"backend": "cuda", "setting": "torch + GPU (paper)", "metric": "in1k_finetune_top1", "value": 86.2},
    {"backend": "xla", "setting": "torch_xla + TPU (paper)", "metric": "in1k_finetune_top1", "value": 85.9},
)


class GapError(UserError, ValueError):
    """A ledger that cannot be read or a report that cannot be made from it."""


FIELDS = ("backend", "setting", "seed", "config_hash", "git_revision", "data", "metric", "value")


@dataclass
class GapResult:
    backend: str
    setting: str
    seed: int
    config_hash: str
    git_revision: str
    data: str
    metric: str
    value: float


def config_hash(config: dict[str, Any]) -> str:
    """Short stable hash of a run's config, with the fields that legitimately differ between rows removed."""
    cleaned = json.loads(json.dumps(config, default=str))
    for section, key in (("run", "seed"), ("run", "out_dir"), ("backend", "name"), ("backend", "precision")):
        cleaned.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(cleaned, sort_keys=True).encode()).hexdigest()[:12]


def append_result(ledger: str, result: GapResult) -> None:
    """Append one row to the ledger at a local path or any fsspec URL (object stores cannot append: the ledger is
    small, so it is rewritten whole)."""
    if not math.isfinite(result.value):
        raise GapError(f"{ledger}: refusing {result.metric}={result.value}: a ledger value must be a finite number")
    line = json.dumps(asdict(result) | {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"
    fs, path = fsspec.core.url_to_fs(ledger)
    before = fs.cat_file(path).decode() if fs.exists(path) else ""
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, (before + line).encode())


def read_ledger(ledger: str) -> list[dict[str, Any]]:
    rows = []
    try:
        with fsspec.open(ledger, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise GapError(f"{ledger}: no such ledger") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GapError(f"{ledger}:{n}: not JSON ({e})") from e
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise GapError(f"{ledger}:{n}: missing {', '.join(missing)}")
        if not isinstance(row["value"], (int, float)) or not math.isfinite(row["value"]):
            raise GapError(f"{ledger}:{n}: value {row['value']!r} is not a finite number")
        rows.append(row)
    return rows


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); nan when either side has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    from scipy.stats import ttest_ind

    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return 1.0 if statistics.mean(a) == statistics.mean(b) else 0.0
    return float(ttest_ind(a, b, equal_var=False).pvalue)


def side_name(row: dict[str, Any]) -> str:
    """A ledger row's side, ``backend:setting``."""
    return f"{row['backend']}:{row['setting']}"


def seed_values(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, int], float]:
    """``metric`` by (side, seed); a seed logged twice for a side keeps its last value."""
    return {(side_name(r), int(r["seed"])): float(r["value"]) for r in rows if r["metric"] == metric}


def paired_p(differences: list[float]) -> float:
    """Two-sided p-value of the paired t-test on per-seed differences; nan for fewer than 2 pairs."""
    if len(differences) < 2:
        return math.nan
    if statistics.pvariance(differences) == 0:  # the same shift on every seed: no noise to compare with
        return 1.0 if differences[0] == 0 else 0.0
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(differences, 0.0).pvalue)


def summarize(rows: list[dict[str, Any]], metric: str, baseline: str, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Per ``backend:setting``: n, mean, std, difference from ``baseline``, the Welch and paired p-values and
    whether the difference exceeds the noise (paired test when >= 2 seeds match, else Welch)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["metric"] == metric:
            groups.setdefault(side_name(r), []).append(float(r["value"]))
    by_seed: dict[str, dict[int, float]] = {}
    for (side, seed), value in seed_values(rows, metric).items():
        by_seed.setdefault(side, {})[seed] = value
    if baseline not in groups:
        raise GapError(f"baseline {baseline!r} has no {metric} rows; have {sorted(groups)}")
    base, base_seeds = groups[baseline], by_seed[baseline]
    out = []
    for name, values in groups.items():
        diffs = [v - base_seeds[seed] for seed, v in by_seed[name].items() if seed in base_seeds]
        welch, paired = (math.nan, math.nan) if name == baseline else (welch_p(values, base), paired_p(diffs))
        p = paired if len(diffs) >= 2 else welch
        out.append(
            {
                "side": name,
                "n": len(values),
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else math.nan,
                "diff": statistics.mean(values) - statistics.mean(base),
                "p": p,
                "welch_p": welch,
                "paired_p": paired,
                "paired_n": 0 if name == baseline else len(diffs),
                "test": "paired" if len(diffs) >= 2 else "welch",
                "significant": bool(p < alpha) if not math.isnan(p) else None,
            }
        )
    return sorted(out, key=lambda s: (s["side"] != baseline, s["side"]))


def render_markdown(
    rows: list[dict[str, Any]], metric: str, baseline: str, alpha: float = 0.05, decimals: int = 2
) -> str:
    lines = [
        f"# Gap ledger: `{metric}`",
        "",
        f"Each setting against `{baseline}`: a paired t-test over the seeds both ran (the seed's own effect cancels)"
        f", Welch's t-test where fewer than 2 seeds match; a difference counts when p < {alpha}.",
        "",
        "| setting | n | mean | std | diff vs baseline | Welch p | paired p (pairs) | exceeds noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ref in PAPER_ROWS:
        if ref["metric"] == metric:
            lines.append(f"| {ref['setting']} | 1 | {ref['value']:.2f} | - | - | - | - | - |")
    d = decimals
    for s in summarize(rows, metric, baseline, alpha):
        std = "-" if math.isnan(s["std"]) else f"{s['std']:.{d}f}"
        welch = "-" if math.isnan(s["welch_p"]) else f"{s['welch_p']:.3g}"
        paired = "-" if math.isnan(s["paired_p"]) else f"{s['paired_p']:.3g} ({s['paired_n']})"
        verdict = "-" if s["significant"] is None else ("**yes**" if s["significant"] else "no")
        diff = "-" if s["side"] == baseline else f"{s['diff']:+.{d}f}"
        cells = [f"`{s['side']}`", str(s["n"]), f"{s['mean']:.{d}f}", std, diff, welch, paired, verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
