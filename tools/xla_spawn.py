#!/usr/bin/env python
"""Pretrain on every local XLA device (TPU chips), one process each, through torch_xla's PJRT launcher.

    python tools/xla_spawn.py --config yaml/pretrain/vit_base_tpu.yaml [section.key=value ...]

On a CPU-only machine (PJRT_DEVICE=CPU) it runs one process: multi-process PJRT on CPU can deadlock in the
all-reduce rendezvous (an open torch_xla problem). For one process per host with a device mesh, use
``digpt pretrain ... backend.name=xla-spmd`` instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _worker(index: int, config: str, overrides: list[str]) -> None:
    from digpt_xla.cli import run_pretrain
    from digpt_xla.config import load_config
    from digpt_xla.repo import find_config

    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [xla:{index}] %(levelname)s %(name)s: %(message)s", force=True
    )
    cfg = load_config(find_config(config), overrides)
    cfg.backend.name = "xla"
    result = run_pretrain(cfg)
    logging.getLogger("xla_spawn").info("process %d stopped (%s) at step %d", index, result.stopped, result.step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--single-process", action="store_true", help="run one process (default when PJRT_DEVICE=CPU)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    from digpt_xla.entry import run_entry

    return run_entry("xla_spawn.py", lambda: _spawn(args))


def _spawn(args: argparse.Namespace) -> int:
    from digpt_xla.backend.mesh import ParallelDims
    from digpt_xla.config import ConfigError, load_config
    from digpt_xla.repo import find_config

    # A mistake in the config is one line here, not a traceback from every spawned process.
    cfg = load_config(find_config(args.config), args.overrides)
    problem = ParallelDims(cfg.backend.name, cfg.backend.fsdp).spawn_problem(args.config)
    if problem:
        raise ConfigError(problem)
    os.environ.setdefault("PJRT_DEVICE", "TPU")
    single = args.single_process or os.environ["PJRT_DEVICE"].upper() == "CPU"

    from digpt_xla.backend.xla import launch

    launch(_worker, (args.config, args.overrides), single_process=single)
    return 0


if __name__ == "__main__":
    sys.exit(main())
