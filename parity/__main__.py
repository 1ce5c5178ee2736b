"""``python -m parity run --config yaml/parity/NAME.yaml [--backends cpu,xla] [--out DIR] [key=value ...]``
``python -m parity gap add|report --ledger FILE ...``: the downstream gap ledger (parity/gap.py).
``python -m parity gap study --config yaml/parity/gap_study_digits.yaml [key=value ...]``: pretrain, probe and
finetune per side and seed into the ledger, then write the study's report (parity/gap_study.py).

Exit code 0 when every check is within the config's tolerances, 1 when one is not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import fsspec

from digpt_xla.cli import run_command
from digpt_xla.repo import find_config
from digpt_xla.rundir import RunDir


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_parity_config
    from .harness import run_parity
    from .report import environment, write_report
    from .sides import Side, SideError

    cfg = load_parity_config(find_config(args.config), args.overrides)
    if args.backends:
        backends = args.backends.split(",")
        if len(backends) != len(cfg.sides):
            raise SideError(f"--backends names {len(backends)} backends for {len(cfg.sides)} sides")
        cfg.sides = [f"{b}:{Side.parse(s).setting}" for b, s in zip(backends, cfg.sides, strict=True)]
    for s in cfg.sides:
        Side.parse(s)
    name = Path(args.config).stem
    out = args.out or os.path.join("runs", "parity", name)
    RunDir(out).check_writable("--out")  # found now, not after the sides have run
    report = run_parity(cfg)
    report["config"] = dataclasses.asdict(cfg)
    report["environment"] = environment()
    files = write_report(report, out, name)
    for comp in report["comparisons"]:
        failed = [c["check"] for c in comp["checks"] if c["ok"] is False]
        fd = comp["first_divergent"]
        print(
            f"{comp['candidate']} vs {comp['reference']}: {'PASS' if comp['passed'] else 'FAIL'}"
            + (f" (over tolerance: {', '.join(failed)})" if failed else "")
            + (f"; first divergent module: {fd['module']} (rel. L2 {fd['rel_l2']:.3g})" if fd else "")
        )
    print(f"report: {files['md']}")
    return 0 if report["passed"] else 1


def cmd_gap_add(args: argparse.Namespace) -> int:
    from digpt_xla.repo import git_revision

    from .gap import GapResult, append_result, config_hash

    chash = args.config_hash
    if args.config:
        from digpt_xla.config import load_config

        chash = config_hash(load_config(args.config, []).to_dict())
    result = GapResult(
        args.backend, args.setting, args.seed, chash or "unknown", git_revision(), args.data, args.metric, args.value
    )
    append_result(args.ledger, result)
    print(f"appended {args.backend}:{args.setting} seed {args.seed} {args.metric}={args.value} to {args.ledger}")
    return 0


def cmd_gap_report(args: argparse.Namespace) -> int:
    from .gap import read_ledger, render_markdown

    text = render_markdown(read_ledger(args.ledger), args.metric, args.baseline, args.alpha)
    if args.out:
        with fsspec.open(args.out, "w", auto_mkdir=True) as f:
            f.write(text)
    print(text)
    return 0


def cmd_gap_study(args: argparse.Namespace) -> int:
    from .gap_study import GapStudy, load_study_config

    cfg = load_study_config(args.config, args.overrides)
    result = GapStudy(cfg).run()
    print(
        f"gap study: {result['ran']} of {result['runs']} runs done now; report {os.path.join(cfg.out_dir, 'report.md')}"
    )
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    from .attribution import Attribution, load_attribution_config

    cfg = load_attribution_config(args.config, args.overrides)
    report = Attribution(cfg).run()
    for entry in report["factors"]:
        print(f"{entry['factor']:40s} {entry['verdict']}")
    print(f"report: {os.path.join(cfg.out_dir, 'report.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sides of a parity config and write the report")
    run.add_argument("--config", required=True)
    run.add_argument("--backends", default="", help="comma list replacing each side's backend, e.g. cpu,xla")
    run.add_argument("--out", default="", help="report directory (default runs/parity/<config name>)")
    run.add_argument("overrides", nargs="*", help="key=value, e.g. steps=5 input.batch_size=4")
    run.set_defaults(fn=cmd_run)
    gap = sub.add_parser("gap", help="the downstream gap ledger").add_subparsers(dest="gap", required=True)
    add = gap.add_parser("add", help="append one downstream result")
    add.add_argument("--ledger", required=True)
    for key in ("backend", "setting", "metric", "data"):
        add.add_argument(f"--{key}", required=key != "data", default="")
    add.add_argument("--seed", type=int, required=True)
    add.add_argument("--value", type=float, required=True)
    add.add_argument("--config", default="", help="the run's YAML (hashed without seed, out_dir and backend)")
    add.add_argument("--config-hash", default="")
    add.set_defaults(fn=cmd_gap_add)
    rep = gap.add_parser(
        "report",
        help="table of the ledger beside the paper's rows, with paired t-tests over "
        "matched seeds (Welch's where fewer than two seeds match)",
    )
    rep.add_argument("--ledger", required=True)
    rep.add_argument("--metric", required=True)
    rep.add_argument("--baseline", required=True, help="backend:setting the others are tested against")
    rep.add_argument("--alpha", type=float, default=0.05)
    rep.add_argument("--out", default="", help="write the Markdown table here as well")
    rep.set_defaults(fn=cmd_gap_report)
    study = gap.add_parser("study", help="pretrain + probe + finetune per side and seed, then the study's report")
    study.add_argument("--config", default="yaml/parity/gap_study_digits.yaml")
    study.add_argument("overrides", nargs="*", help="key=value, e.g. seeds=[0] sides=[cpu:fp32,cpu:bf16]")
    study.set_defaults(fn=cmd_gap_study)
    attribute = sub.add_parser(
        "attribute", help="which factor shifts training beyond a one-ulp change: the factor table over seeds"
    )
    attribute.add_argument(
        "--config",
        required=True,
        help="the study, e.g. yaml/parity/attribution_tiny.yaml (72 runs, about 40 minutes on 2 cores)",
    )
    attribute.add_argument("overrides", nargs="*", help="key=value, e.g. seeds=[0,1] steps=20")
    attribute.set_defaults(fn=cmd_attribute)
    return run_command(parser, argv, (FileNotFoundError,))  # a --config or --ledger path that does not exist


if __name__ == "__main__":
    sys.exit(main())
