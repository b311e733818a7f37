"""Folder galleries: indexing rate (images/s) and query latency, for the smoke model and the paper-size model.

The folder is a plain copy of the synthetic benchmark's images (``synthetic:cuhk-like``, 128x64 PNGs: test,
then val and train) with no annotations. For each model (random initialisation: the rate and latency do not
depend on the weights; ``--models smoke paper``; paper = ViT-B/16 at 384x128 + BERT-base):

* decode rate: ``tbps_lib.gallery.decode_image`` alone (open, checks, convert, resize), images/s;
* cold index: ``index_folder`` with an empty cache (scan + decode + ``encode_images`` + cache write), images/s;
* warm index: the same folder again (scan + cache read, nothing encoded), ms;
* query latency: ``CaptionSearch.search`` over the folder gallery (caption encoding + scoring + top-10,
  ``latency_ms``), median and p90 over ``--queries`` test captions after warm-up.

Everything on the CPU with ``--threads`` torch threads, one loader process (``num_workers=0``).

    python benchmarks/folder_index.py --models smoke --images 3000
    python benchmarks/folder_index.py --models paper --images 256 --queries 50
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tbps_lib.config import make_config
from tbps_lib.data.loaders import build_tokenizer, prepare_dataset, train_captions
from tbps_lib.gallery import decode_image, index_folder
from tbps_lib.models.registry import build_model
from tbps_lib.search import CaptionSearch
from tbps_lib.utils import seed_everything


def copy_images(ds, n: int, dest: Path) -> None:
    """The first ``n`` images of test, val, train into ``dest`` (100 per subfolder)."""
    records = [(split, r) for split in ("test", "val", "train") if split in ds.splits for r in ds.split(split)]
    if len(records) < n:
        raise SystemExit(f"the dataset has {len(records)} images; ask for --images <= that")
    for i, (_, record) in enumerate(records[:n]):
        sub = dest / f"part{i // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        source = ds.image_path(record)
        shutil.copy2(source, sub / f"{i:05d}{source.suffix}")


def measure(name: str, images: int, args: argparse.Namespace) -> dict:
    cfg = make_config("baseline", name, "synthetic:cuhk-like")
    cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, pretrained=None),
                              text=dataclasses.replace(cfg.text, pretrained=None))
    ds = prepare_dataset(cfg)
    tokenizer = build_tokenizer(cfg, train_captions(ds))
    seed_everything(0)
    model = build_model(cfg).eval()
    size = tuple(cfg.image.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "photos", Path(tmp) / "cache"
        copy_images(ds, images, folder)
        files = sorted(folder.rglob("*.png"))[: min(images, 500)]
        start = time.perf_counter()
        for f in files:
            decode_image(f, size)
        decode_rate = len(files) / (time.perf_counter() - start)
        start = time.perf_counter()
        cold = index_folder(model, folder, size, cache, "bench", batch_size=args.batch_size, progress=False)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = index_folder(model, folder, size, cache, "bench", batch_size=args.batch_size, progress=False)
        warm_ms = (time.perf_counter() - start) * 1000
        assert warm.stats["encoded"] == 0 and len(warm) == images
        searcher = CaptionSearch(model, tokenizer, cold.to_encoded(), backend="torch", name=f"{name}/folder")
        captions = [c for r in ds.split("test") for c in r.captions]
        for c in captions[: args.warmup]:
            searcher.search(c, k=10)
        latency = [searcher.search(captions[(args.warmup + i) % len(captions)], k=10).attrs["latency_ms"]
                   for i in range(args.queries)]
    ordered = sorted(latency)
    return {"model": f"{name} ({cfg.image.arch} {size[0]}x{size[1]} + {cfg.text.arch})", "images": images,
            "decode": decode_rate, "cold": images / cold_s, "cold_s": cold_s, "warm_ms": warm_ms,
            "query": (statistics.median(ordered), ordered[int(round(0.9 * (len(ordered) - 1)))])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smoke"], choices=["smoke", "paper"])
    parser.add_argument("--images", type=int, nargs="+", default=[3000],
                        help="folder size per model (one value, or one per model)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.images if len(args.images) == len(args.models) else args.images[:1] * len(args.models)
    rows = [measure(m, n, args) for m, n in zip(args.models, sizes)]
    print(f"CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end), {args.threads} torch "
          f"threads, torch {torch.__version__}, batch {args.batch_size}, num_workers 0; random-init weights\n")
    print("| model | images | decode only, img/s | cold index, img/s (s) | warm re-index ms | query ms median (p90) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['images']:,} | {r['decode']:.0f} | {r['cold']:.1f} ({r['cold_s']:.1f}) | "
              f"{r['warm_ms']:.0f} | {r['query'][0]:.1f} ({r['query'][1]:.1f}) |")


if __name__ == "__main__":
    main()
