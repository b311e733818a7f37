"""Speed and memory of the evaluation metrics and the two re-rankings; prints a Markdown table.

    python benchmarks/metrics.py [--n 20000] [--seed 0] [--threads 2]

1. ``rank_metrics`` against a plain full-argsort evaluation (written below, the obvious way) on a
   random n x n float32 similarity whose person ids give each query a few hits (about 2 images per
   id, as in CUHK-PEDES); the two must agree.
2. ``visual_neighbors`` and ``k_reciprocal`` (the released code's form, the default; and
   ``form="paper"``, the paper text's) at CUHK-PEDES test size (6,156 captions x 3,074 images,
   1,000 ids) on random L2-normalised features clustered by identity, so neighbours mean something.
3. Two-stage inference (``rerank="rescore"``: ``engine.evaluate.rescore_topk`` + ``rescored_ranking``) at the
   same size, top-128 per query, 512 pairs per call (``eval.rescore_pairs``), with a fake pairwise head that
   gathers each candidate's 16 x 64 image tokens (as a cross-attention head gathers patch tokens).

Each variant runs in a fresh subprocess that first builds its inputs; then, for each run, the
kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), the resident size is read (``VmRSS``),
the variant runs, and the peak (``VmHWM``) minus that baseline is "peak MB above input" (largest
over runs). Time is wall clock (``time.perf_counter``) of the call alone, best of ``--repeat`` runs
(the slow full-argsort reference runs once).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CUHK_TEXTS, CUHK_IMAGES, CUHK_IDS = 6156, 3074, 1000
BLOCK_ROWS = 1000  # rows per block when generating inputs and in the plain reference


# ----------------------------------------------------------------------------------------------
# memory measurement
# ----------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(fn, repeat: int) -> tuple[object, float, float]:
    """Run ``fn()`` ``repeat`` times; return (last result, best seconds, largest peak MB of resident
    memory above the level before the run)."""
    best, peak = float("inf"), 0.0
    for _ in range(repeat):
        result = None  # free the previous run's result before measuring the next
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        base = _status_kb("VmRSS")
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, (_status_kb("VmHWM") - base) / 1024)
    return result, best, peak


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def metric_inputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n x n float32 similarity, query ids, gallery ids: n/2 ids (~2 images each), hits score higher."""
    rng = np.random.default_rng(seed)
    gallery_pids = rng.integers(0, n // 2, n)
    query_pids = gallery_pids[rng.integers(0, n, n)]  # every query has at least one hit
    sim = np.empty((n, n), dtype=np.float32)
    for lo in range(0, n, BLOCK_ROWS):  # block by block: no n x n temporaries
        block = sim[lo:lo + BLOCK_ROWS]
        block[:] = rng.standard_normal(block.shape, dtype=np.float32)
        block += 2.5 * (query_pids[lo:lo + BLOCK_ROWS, None] == gallery_pids[None, :])
    return sim, query_pids, gallery_pids


def rerank_inputs(seed: int) -> dict[str, torch.Tensor]:
    """CUHK-PEDES-sized similarities from features clustered by identity (about 50% Rank-1)."""
    gen = torch.Generator().manual_seed(seed)
    dim, noise = 256, 2.2
    centres = torch.randn(CUHK_IDS, dim, generator=gen)
    image_ids = torch.randint(0, CUHK_IDS, (CUHK_IMAGES,), generator=gen)
    image_ids[:CUHK_IDS] = torch.arange(CUHK_IDS)
    extra = CUHK_TEXTS - 2 * CUHK_IMAGES  # two captions per image, a few images have a third
    text_ids = torch.cat([image_ids.repeat_interleave(2), image_ids[:extra]])
    unit = torch.nn.functional.normalize
    images = unit(centres[image_ids] + noise * torch.randn(CUHK_IMAGES, dim, generator=gen), dim=1)
    texts = unit(centres[text_ids] + noise * torch.randn(CUHK_TEXTS, dim, generator=gen), dim=1)
    return {"q_g": texts @ images.T, "q_q": texts @ texts.T, "g_g": images @ images.T,
            "text_ids": text_ids, "image_ids": image_ids}


# ----------------------------------------------------------------------------------------------
# the plain reference: argsort each full row
# ----------------------------------------------------------------------------------------------
def full_argsort_metrics(sim: np.ndarray, query_pids: np.ndarray, gallery_pids: np.ndarray,
                         ks=(1, 5, 10)) -> dict[str, float]:
    """R@K, mAP, mINP in percent by a stable argsort of every full row (rows in blocks of 1,000)."""
    n_q, n_g = sim.shape
    sums = {**{f"R{k}": 0.0 for k in ks}, "mAP": 0.0, "mINP": 0.0}
    positions = np.arange(1, n_g + 1)
    for lo in range(0, n_q, BLOCK_ROWS):
        order = np.argsort(-sim[lo:lo + BLOCK_ROWS], axis=1, kind="stable")
        match = gallery_pids[order] == query_pids[lo:lo + BLOCK_ROWS, None]
        n_hits = match.sum(axis=1)
        for k in ks:
            sums[f"R{k}"] += match[:, :k].any(axis=1).sum()
        sums["mAP"] += ((match.cumsum(axis=1) / positions * match).sum(axis=1) / n_hits).sum()
        last = n_g - np.argmax(match[:, ::-1], axis=1)
        sums["mINP"] += (n_hits / last).sum()
    return {key: float(100.0 * v / n_q) for key, v in sums.items()}


# ----------------------------------------------------------------------------------------------
# one variant per subprocess
# ----------------------------------------------------------------------------------------------
RESCORE_K, RESCORE_PAIRS, TOKENS, TOKEN_DIM = 128, 512, 16, 64


def rescore_head():
    """A fake pairwise head: mean over each candidate's gathered image tokens of their dot product with the
    text (``RetrievalModel.rescore`` signature), sized by ``eval.rescore_k`` / ``eval.rescore_pairs``."""
    from types import SimpleNamespace

    from tbps_lib.models.base import RetrievalModel

    class TokenHead(RetrievalModel):
        def __init__(self) -> None:
            super().__init__(SimpleNamespace(eval=SimpleNamespace(rescore_k=RESCORE_K, rescore_pairs=RESCORE_PAIRS)))
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def rescore(self, image_feats, text_feats, candidates):
            tokens = image_feats["tokens"][candidates]  # [n_texts, k, T, D]: the head's working set
            return torch.einsum("nktd,nd->nk", tokens, text_feats["global"]) / tokens.shape[2]

    return TokenHead()


def run_worker(variant: str, n: int, seed: int, repeat: int) -> dict:
    """Build the inputs, measure one variant (best of ``repeat`` runs), return its numbers."""
    from tbps_lib.engine.metrics import rank_metrics
    from tbps_lib.engine.rerank import k_reciprocal, visual_neighbors

    if variant in ("rank_metrics", "full_argsort"):
        sim, qp, gp = metric_inputs(n, seed)
        fn = rank_metrics if variant == "rank_metrics" else full_argsort_metrics
        result, seconds, peak = measure(lambda: fn(sim, qp, gp), 1 if variant == "full_argsort" else repeat)
        return {"seconds": seconds, "peak_mb": peak, "metrics": result}
    x = rerank_inputs(seed)
    if variant == "visual_neighbors":
        scores, seconds, peak = measure(lambda: visual_neighbors(x["q_g"], x["g_g"], k=5), repeat)
    elif variant == "k_reciprocal":
        scores, seconds, peak = measure(lambda: k_reciprocal(x["q_g"], x["q_q"], x["g_g"]), repeat)
    elif variant == "k_reciprocal_paper":
        scores, seconds, peak = measure(lambda: k_reciprocal(x["q_g"], x["q_q"], x["g_g"], form="paper"), repeat)
    elif variant == "rescore":
        from tbps_lib.engine.evaluate import rescore_topk, rescored_ranking

        gen = torch.Generator().manual_seed(seed)
        head, texts = rescore_head(), torch.randn(CUHK_TEXTS, TOKEN_DIM, generator=gen)
        tokens = {"tokens": torch.randn(CUHK_IMAGES, TOKENS, TOKEN_DIM, generator=gen)}
        scores, seconds, peak = measure(
            lambda: rescored_ranking(x["q_g"], *rescore_topk(head, tokens, {"global": texts}, x["q_g"])), repeat)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return {"seconds": seconds, "peak_mb": peak,
            "before": rank_metrics(x["q_g"], x["text_ids"], x["image_ids"]),
            "metrics": rank_metrics(scores, x["text_ids"], x["image_ids"])}


def spawn(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh interpreter (so peak memory is its own) and parse its JSON line."""
    cmd = [sys.executable, __file__, "--worker", variant, "--n", str(args.n), "--seed", str(args.seed),
           "--threads", str(args.threads), "--repeat", str(args.repeat)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark variant {variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt(metrics: dict[str, float]) -> str:
    """Metrics on one line."""
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def report(args: argparse.Namespace) -> None:
    """Run every variant and print the comparison and the Markdown table."""
    res = {v: spawn(v, args) for v in ("full_argsort", "rank_metrics", "visual_neighbors", "k_reciprocal",
                                       "k_reciprocal_paper", "rescore")}
    ours, ref = res["rank_metrics"], res["full_argsort"]
    agree = all(abs(ours["metrics"][k] - ref["metrics"][k]) < 1e-9 for k in ref["metrics"])
    print(f"torch threads: {args.threads} (torch.set_num_threads); NumPy kernels are single-threaded; "
          f"CPU cores on this machine: {os.cpu_count()}")
    print("peak MB above input: fresh subprocess per row; after building the inputs the peak-RSS mark "
          "is reset (/proc/self/clear_refs), VmRSS is read, the call runs, and VmHWM minus that VmRSS "
          f"is reported (largest over runs). Time: wall clock of the call alone, best of {args.repeat} runs "
          "(the full-argsort reference: one run).")
    print(f"\nrank_metrics vs full argsort on {args.n} x {args.n} float32 "
          f"({'values agree' if agree else 'VALUES DIFFER'}): {fmt(ours['metrics'])}")
    for v in ("visual_neighbors", "k_reciprocal", "k_reciprocal_paper"):
        print(f"{v} at CUHK-PEDES test size: before {fmt(res[v]['before'])}\n"
              f"{' ' * len(v)}                           after  {fmt(res[v]['metrics'])}")
    rows = [
        (f"rank_metrics, {args.n} x {args.n}", ours, f"<= full argsort ({ref['seconds']:.1f} s), <= 512 MB",
         ours["seconds"] <= ref["seconds"] and ours["peak_mb"] <= 512 and agree),
        (f"full-argsort reference, {args.n} x {args.n}", ref, "reference", None),
        (f"visual_neighbors (k=5), {CUHK_TEXTS} x {CUHK_IMAGES}", res["visual_neighbors"], "<= 2 s",
         res["visual_neighbors"]["seconds"] <= 2),
        *((f"{v} (k1=20, k2=6), {CUHK_TEXTS} x {CUHK_IMAGES}", res[v], "<= 60 s, <= 4096 MB",
           res[v]["seconds"] <= 60 and res[v]["peak_mb"] <= 4096) for v in ("k_reciprocal", "k_reciprocal_paper")),
        (f"rescore (top-{RESCORE_K}, {RESCORE_PAIRS} pairs/call, fake {TOKENS}x{TOKEN_DIM}-token head), "
         f"{CUHK_TEXTS} x {CUHK_IMAGES}", res["rescore"], "<= 4096 MB", res["rescore"]["peak_mb"] <= 4096),
    ]
    print("\n| what | time (s) | peak MB above input | goal | met? |\n|---|---:|---:|---|---|")
    for what, r, goal, met in rows:
        mark = "-" if met is None else ("yes" if met else "NO")
        print(f"| {what} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | {goal} | {mark} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="queries = gallery size for rank_metrics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per variant, best time reported (the slow reference runs once)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1 or args.n < 2:
        parser.error("--repeat must be >= 1 and --n >= 2")
    torch.set_num_threads(args.threads)
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this benchmark measures memory through /proc (Linux only)")
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.n, args.seed, args.repeat)))
    else:
        report(args)


if __name__ == "__main__":
    main()
