"""``python -m vlmsae.bench [--quick] [--out DIR] [--only NAME ...] [--photos DIR]``: run the benchmarks."""

from __future__ import annotations

import argparse
import os
import sys

from vlmsae.bench.harness import DEFAULT_OUT_DPATH, MODULES, run_all
from vlmsae.bench.photos import PHOTOS_ENV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmsae.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke run (seconds)")
    parser.add_argument("--out", default=str(DEFAULT_OUT_DPATH), help=f"output folder (default {DEFAULT_OUT_DPATH})")
    parser.add_argument("--only", nargs="+", choices=MODULES, help="run only these benchmark modules")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other keys of an existing results.json (make bench-gpu)"
    )
    parser.add_argument(
        "--photos",
        help="a folder of real JPEG photographs (e.g. ImageNet val) for the decode rows' *_photos keys; "
        "default: tiles of Debian's mate-backgrounds photographs, fetched once with apt-get (vlmsae/bench/photos.py)",
    )
    args = parser.parse_args(argv)
    if args.photos:
        os.environ[PHOTOS_ENV] = args.photos  # read where the decode rows pick their photo set
    results = run_all(quick=args.quick, out_dpath=args.out, only=args.only, merge=args.merge)
    errors = [key for key in results if key.endswith("_error")]
    print(f"wrote {args.out}/results.json and results.md ({len(results)} keys, {len(errors)} module errors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
