"""Caption search latency: per query on a 3,000-image gallery (plain and re-ranked), and on a
1,000,000 x 256 random gallery with torch and with faiss.

The 3,000-image gallery holds real encodings: the default smoke baseline run (trained first if the registry
lacks it) encodes the synthetic benchmark's test, val and train images (test first), and the queries are the
test captions, so each query's person is in the gallery. A query's latency is what ``CaptionSearch.search``
reports: tokenising and encoding the caption with the model, scoring it against the gallery and the top-k
(``latency_ms``); the end-to-end column adds building the result table. Re-ranking with visual neighbours uses
the image-image similarities computed once per gallery (timed on its own, "one-time").

The large gallery is random (normal, L2-normalised), searched with :class:`tbps_lib.search.GalleryIndex`
(torch matmul + top-k, and faiss ``IndexFlatIP``, both exact) with the smoke model's text embeddings of test
captions as queries; add the text-encoding row for a full query. Everything runs on the CPU after warm-up,
with ``--threads`` threads (torch and faiss).

    python benchmarks/search_latency.py                       # 2 threads, 200 queries, 1,000,000 x 256
    python benchmarks/search_latency.py --threads 2 --queries 50 --big 200000
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps_lib.config import make_config
from tbps_lib.engine.evaluate import Encoded
from tbps_lib.engine.runs import train_or_load
from tbps_lib.search import CaptionSearch, GalleryIndex, faiss_available


def percentiles(ms: list[float]) -> tuple[float, float]:
    """Median and 90th percentile of a list of milliseconds."""
    ordered = sorted(ms)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def timed(fn: Callable[[], object], repeat: int, warmup: int) -> list[float]:
    """Milliseconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def gallery_of(run, size: int) -> Encoded:
    """``size`` images of the run's test, val and train splits (test first), queried by the test captions."""
    parts = [run.embeddings(split) for split in ("test", "val", "train")]
    feats = torch.cat([p.image_feats["global"] for p in parts])
    pids = torch.cat([p.gallery_pids for p in parts])
    paths = [path for p in parts for path in p.image_paths]
    if feats.shape[0] < size:
        raise SystemExit(f"the run's dataset has only {feats.shape[0]} images; ask for --gallery <= that")
    test = parts[0]
    return Encoded(split="test+val+train", image_feats={"global": feats[:size]}, text_feats=test.text_feats,
                   query_pids=test.query_pids, gallery_pids=pids[:size], image_paths=paths[:size],
                   captions=test.captions, query_image_index=test.query_image_index)


def small_gallery_rows(args: argparse.Namespace) -> tuple[list[dict], Tensor]:
    """Rows of the real 3,000-image gallery, and the test captions' normalised text embeddings (the queries
    of the large gallery)."""
    run = train_or_load(make_config("baseline", "smoke", "synthetic:cuhk-like"), progress=False, device="cpu")
    encoded = gallery_of(run, args.gallery)
    searcher = CaptionSearch(run.model, run.tokenizer, encoded, backend="torch", name=f"{run.name}/3k")
    captions = encoded.captions
    rows = []
    n = args.queries

    def series(rerank: str | None, count: int) -> tuple[list[float], list[float], int]:
        latency, total, found = [], [], 0
        for i in range(args.warmup):
            searcher.search(captions[i % len(captions)], k=10, rerank=rerank)
        for i in range(count):
            start = time.perf_counter()
            table = searcher.search(captions[(args.warmup + i) % len(captions)], k=10, rerank=rerank)
            total.append((time.perf_counter() - start) * 1000)
            latency.append(table.attrs["latency_ms"])
            found += bool(table["match"].eq(True).any())
        return latency, total, found

    encode = timed(lambda: searcher.encode_caption(captions[0]), n, args.warmup)
    rows.append({"what": "text encoding of one caption", "gallery": "-", "backend": "torch",
                 "ms": percentiles(encode), "total": None, "goal": None})
    latency, total, found = series(None, n)
    rows.append({"what": "search: encode + score + top-10", "gallery": f"{args.gallery:,}", "backend": "torch",
                 "ms": percentiles(latency), "total": percentiles(total), "goal": 50.0,
                 "note": f"true person in the top 10 for {found}/{n} queries"})
    start = time.perf_counter()
    searcher.image_image()
    rows.append({"what": "image-image similarities (once per gallery)", "gallery": f"{args.gallery:,}",
                 "backend": "torch", "ms": ((time.perf_counter() - start) * 1000,) * 2, "total": None, "goal": None})
    latency, total, found = series("visual_neighbors", n)
    rows.append({"what": "search + visual_neighbors re-ranking", "gallery": f"{args.gallery:,}", "backend": "torch",
                 "ms": percentiles(latency), "total": percentiles(total), "goal": 200.0,
                 "note": f"true person in the top 10 for {found}/{n} queries"})
    if args.k_reciprocal:
        latency, total, found = series("k_reciprocal", args.k_reciprocal)
        rows.append({"what": "search + k_reciprocal re-ranking", "gallery": f"{args.gallery:,}", "backend": "torch",
                     "ms": percentiles(latency), "total": percentiles(total), "goal": None,
                     "note": f"{args.k_reciprocal} queries"})
    return rows, F.normalize(encoded.text_feats["global"].float(), dim=-1)


def big_gallery_rows(args: argparse.Namespace, queries: Tensor) -> list[dict]:
    """Rows of the random ``args.big`` x ``args.dim`` gallery: torch, then faiss (with ``--threads`` and with
    one thread), and whether faiss returns torch's top-10."""
    gen = torch.Generator().manual_seed(args.seed)
    gallery = torch.randn(args.big, args.dim, generator=gen)
    if queries.shape[1] != args.dim:  # the smoke model's width differs: random queries instead
        queries = F.normalize(torch.randn(queries.shape[0], args.dim, generator=gen), dim=-1)
    rows, results = [], {}
    runs = [("torch", args.threads)]
    if faiss_available():
        runs += [("faiss", args.threads)] + ([("faiss", 1)] if args.threads != 1 else [])
    size = f"{args.big:,} x {args.dim}"
    for backend, threads in runs:
        set_threads(threads)
        start = time.perf_counter()
        index = GalleryIndex(gallery, backend=backend)
        build_ms = (time.perf_counter() - start) * 1000
        calls = [0]

        def one_query() -> None:
            calls[0] += 1
            index.top_k(queries[calls[0] % len(queries)][None], 10)

        ms = timed(one_query, args.big_queries, 3)
        results[backend] = index.top_k(queries[:20], 10)[1]
        name = "faiss IndexFlatIP" if backend == "faiss" else "torch matmul + topk"
        rows.append({"what": "score + top-10 (query embedding given)", "gallery": size,
                     "backend": f"{name}, {threads} thread{'s' if threads > 1 else ''}",
                     "ms": percentiles(ms), "total": None, "goal": None,
                     "note": f"index build {build_ms / 1000:.1f} s"})
        index = None  # free this gallery copy before the next backend builds its own
    set_threads(args.threads)
    if "faiss" not in results:
        rows.append({"what": "faiss", "gallery": size, "backend": "faiss", "ms": None, "total": None, "goal": None,
                     "note": "not installed (pip install faiss-cpu): not measured"})
    else:
        same = int((results["torch"] == results["faiss"]).all(dim=1).sum())
        rows[-1]["note"] += f"; same top-10 as torch for {same}/20 queries"
    return rows


def set_threads(threads: int) -> None:
    """Math threads of torch and (when installed) faiss's OpenMP."""
    torch.set_num_threads(threads)
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--gallery", type=int, default=3000, help="images in the real gallery")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per row (after warm-up)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--k-reciprocal", type=int, default=10, help="queries for the k-reciprocal row (0: skip)")
    parser.add_argument("--big", type=int, default=1_000_000, help="rows of the random gallery (0: skip)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--big-queries", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_threads(args.threads)
    rows, queries = small_gallery_rows(args)
    if args.big:
        rows += big_gallery_rows(args, queries)
    load = os.getloadavg()[0]
    print(f"CPU ({os.cpu_count()} cores, load average {load:.1f} at the end), {args.threads} threads (torch and "
          f"faiss) unless the row says otherwise, torch {torch.__version__}, "
          f"faiss {'installed' if faiss_available() else 'not installed'}; {args.queries} timed queries per "
          f"3k row after {args.warmup} warm-up, {args.big_queries} per large-gallery row; times in ms, "
          f"median (p90)\n")
    print("| what | gallery | backend | latency ms | end-to-end ms | goal | met? | note |")
    print("|---|---|---|---:|---:|---|---|---|")
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms'][0]:.1f} ({r['ms'][1]:.1f})"
        total = "-" if r["total"] is None else f"{r['total'][0]:.1f} ({r['total'][1]:.1f})"
        goal = "-" if r["goal"] is None else f"<= {r['goal']:.0f} ms"
        met = "-" if r["goal"] is None or r["ms"] is None else ("yes" if r["ms"][0] <= r["goal"] else "no")
        print(f"| {r['what']} | {r['gallery']} | {r['backend']} | {ms} | {total} | {goal} | {met} | "
              f"{r.get('note', '')} |")


if __name__ == "__main__":
    main()
