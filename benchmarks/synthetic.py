"""Speed of the synthetic benchmark generator: images per second per preset, and what that means.

Generates a scaled-down set of each preset into a temporary folder, times it, and prints images/s with
the estimated time of the default set (about 1,000 identities) and of a set the size of the real
dataset the preset mirrors. Usage::

    python benchmarks/synthetic.py                      # 150 identities per preset, all cores
    python benchmarks/synthetic.py --ids 400 --workers 2 --presets cuhk-like --size 384x128
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from tbps_lib.data import synthetic

# Identities of the real datasets (the "paper-sized" sets).
REAL_IDS = {"cuhk-like": 13003, "icfg-like": 4102, "rstp-like": 4101}


def measure(preset: str, ids: int, size: tuple[int, int], workers: int) -> tuple[int, float]:
    """Generate ``ids`` identities of ``preset``; return (images written, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = synthetic.generate(preset, Path(tmp) / "set", ids=ids, size=size, progress=False, workers=workers)
        seconds = time.perf_counter() - start
        images = sum(1 for _ in (out / "imgs").rglob("*.png"))
    return images, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=150, help="identities per preset to time (default 150)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--size", default="128x64", help="HEIGHTxWIDTH (default 128x64)")
    parser.add_argument("--presets", nargs="+", default=sorted(synthetic.PRESETS))
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    print(f"synthetic generator, {args.ids} ids per preset, size {args.size}, {args.workers} worker(s), "
          f"{os.cpu_count()} CPU core(s)")
    print(f"{'preset':<10} {'images':>7} {'seconds':>8} {'images/s':>9} {'default set':>12} {'real-sized set':>15}")
    for name in args.presets:
        p = synthetic.get_preset(name)
        images, seconds = measure(name, args.ids, size, args.workers)
        rate = images / seconds
        default_s = p.default_ids * p.mean_images_per_id() / rate
        real_s = REAL_IDS[name] * p.mean_images_per_id() / rate
        print(f"{name:<10} {images:>7} {seconds:>8.1f} {rate:>9.1f} {default_s:>10.0f} s "
              f"{real_s / 60:>12.1f} min")


if __name__ == "__main__":
    main()
