#!/usr/bin/env python
"""Write webdataset tar shards (``.jpg``/``.png`` + ``.cls``) with a manifest, or check an existing set.

    python tools/make_shards.py imagefolder /data/imagenet/train gs://bucket/in1k/train --per-shard 1250
    python tools/make_shards.py digits /tmp/digits_shards --per-shard 200
    python tools/make_shards.py check gs://bucket/in1k/train        # or 'gs://bucket/in1k/train/shard-{000000..001024}.tar'

``OUT`` is a directory on any fsspec filesystem; shards are ``OUT/shard-NNNNNN.tar`` and ``OUT/manifest.json``
records the sample count of every shard, the class map and the source. ``check`` decodes every sample, lists the
bad ones (shard, key, reason) and exits 1 if any sample is bad or a shard's count differs from the manifest.
Train on the result with ``data.source=webdataset data.urls='OUT/shard-{000000..NNNNNN}.tar'``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from digpt_xla.data.shard_io import (
    check_shards,
    digits_samples,
    image_folder_samples,
    shard_spec,
    write_shards,
)
from digpt_xla.entry import run_entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true")
    folder = sub.add_parser("imagefolder", parents=[common], help="an ImageNet-layout folder -> shards")
    folder.add_argument("root")
    digits = sub.add_parser("digits", parents=[common], help="scikit-learn's embedded digits -> shards")
    digits.add_argument("--img-size", type=int, default=32)
    for p in (folder, digits):
        p.add_argument("out", help="output directory: local path or fsspec URL (gs://bucket/dir)")
        p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
        p.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards")
    check = sub.add_parser("check", parents=[common], help="re-read shards and report bad samples")
    check.add_argument("spec", help="a directory with manifest.json, or brace-expanded shard URLs")
    args = parser.parse_args(argv)
    return run_entry("make_shards.py", lambda: _run(args), log_level=logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command == "check":
        report = check_shards(args.spec, progress=progress)
        for shard, key, reason in report.bad:
            print(f"BAD {shard} {key}: {reason}")
        for shard, (found, expected) in report.count_mismatch.items():
            print(f"COUNT {shard}: {found} samples, manifest says {expected}")
        print(
            f"{report.shards} shards, {report.samples} samples, {report.readable} readable, "
            f"{len(report.bad)} bad: {'OK' if report.ok else 'FAILED'}"
        )
        return 0 if report.ok else 1
    if args.command == "imagefolder":
        samples, total, classes = image_folder_samples(args.root, args.seed)
        source = args.root
    else:
        samples, total, classes = digits_samples(args.img_size)
        source = f"sklearn digits, {args.img_size}px"
    manifest = write_shards(samples, total, args.out, args.per_shard, classes, source, progress=progress)
    spec = shard_spec(args.out, manifest)
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards: data.urls='{spec}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
