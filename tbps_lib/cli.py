"""The ``tbps`` command.

``tbps data inspect`` summarises a dataset per split; ``tbps data synth`` writes the synthetic benchmark.
Each sub-command is a small function over the library; errors in the input are printed as one clear line
(exit status 2), never as a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from tbps_lib.data.formats import READERS, DatasetError, load_dataset, split_counts


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HEIGHTxWIDTH (e.g. 128x64), got {text!r}")
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Print per-split images, identities, captions and caption-length statistics."""
    ds = load_dataset(args.dataset, root=args.root, strict=not args.lenient)
    if args.json:
        print(json.dumps(split_counts(ds), indent=2))
        return 0
    print(f"{ds.name} at {ds.root}")
    header = f"{'split':<6} {'images':>8} {'ids':>7} {'captions':>9}  words/caption mean±std [min, median, max]"
    print(header)
    for s, st in ds.stats().items():
        print(f"{s:<6} {st['images']:>8} {st['ids']:>7} {st['captions']:>9}  "
              f"{st['words_mean']:.1f}±{st['words_std']:.1f} [{st['words_min']}, "
              f"{st['words_median']:g}, {st['words_max']}]")
    if ds.report.n_skipped or ds.report.notes:
        print(ds.report.summary())
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Write the synthetic benchmark in the CUHK-PEDES layout."""
    from tbps_lib.data import synthetic

    out = synthetic.generate(args.preset, Path(args.out), seed=args.seed, ids=args.ids, size=args.size,
                             difficulty=args.difficulty, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tbps", description="Text-based person search workbook.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect or generate datasets").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("inspect", help="per-split statistics of a dataset")
    p.add_argument("--dataset", required=True,
                   help=f"one of {sorted(READERS)}, synthetic:<preset>, or a dataset folder")
    p.add_argument("--root", help="the dataset folder (for a named dataset)")
    p.add_argument("--json", action="store_true", help="print {split: {images, ids, captions}} as JSON")
    p.add_argument("--lenient", action="store_true", help="skip bad records and report them instead of failing")
    p.set_defaults(func=cmd_data_inspect)

    p = data.add_parser("synth", help="generate the synthetic benchmark")
    p.add_argument("--preset", default="cuhk-like", help="cuhk-like, icfg-like or rstp-like")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids", type=int, default=None, help="number of identities (default: the preset's)")
    p.add_argument("--size", type=_size, default=(128, 64), help="image HEIGHTxWIDTH (default 128x64)")
    p.add_argument("--difficulty", type=float, default=None, help="how alike identities are (preset default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tbps`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"tbps: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
