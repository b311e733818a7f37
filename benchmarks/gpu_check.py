"""GPU check: every registered method's paper preset trained for a few hundred steps, then a CUHK-test-sized
evaluation, in one command (at most 8 minutes on one GPU).

For each method of the registry (``list_methods()``), with its ``paper`` preset (the paper's image size and
backbones, e.g. ViT-B/16 at 384x128 and BERT-base with 100 tokens for the baseline) and random weights
(``image.pretrained`` / ``text.pretrained`` set to None: nothing is read or downloaded):

* training: the trainer's own ``train_step`` (bf16 autocast on CUDA, the method's full loss, its optimiser)
  on **random batches shaped like the preset's data** (``train_throughput.random_batch``: images at the paper
  resolution, full-length captions, 2 pairs per identity), not on rendered synthetic images, so that data
  loading and image decoding are left out and the check needs no dataset. A pool of ``--pool`` fixed batches
  is cycled, so the loss can fall: "loss start / end" are the means over the first and last 10 steps.
  Printed: pairs/s (after ``--warmup`` steps, one synchronisation at each end of the timed loop), peak GPU
  memory (``max_memory_allocated``), and the host synchronisations of one training step, counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` (0 is the goal: the step loop reads nothing back).
* evaluation: a CUHK-PEDES-test-sized split (3,074 images, 6,156 captions, 1,000 identities), random inputs,
  through the engine: ``engine.evaluate.encode_loaders`` (eval mode, bf16 autocast, ``eval.batch_size``),
  then ``engine.evaluate.evaluate`` (chunked similarity on the GPU, chunked ranking on the host); plus
  ``rerank="rescore"`` for methods with a second stage. Printed: encode and evaluate seconds.

Each method's training stops early when it has used ``--seconds-per-method`` (default: 8 minutes shared
among the methods, minus the evaluations), and says how many steps it ran.

    python benchmarks/gpu_check.py                 # on a GPU: every method, paper presets
    python benchmarks/gpu_check.py --tiny          # on CPU in seconds: smoke presets, tiny sizes (CI runs this)
    python benchmarks/gpu_check.py --methods baseline --steps 300
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import bench_config, random_batch  # noqa: E402 (benchmarks/ is not a package)

from tbps_lib.engine.evaluate import RESCORE, encode_loaders, evaluate  # noqa: E402
from tbps_lib.engine.trainer import build_optimizer, train_step  # noqa: E402
from tbps_lib.models import build_model, list_methods  # noqa: E402
from tbps_lib.utils import select_device  # noqa: E402

#: CUHK-PEDES test split (the TBPS papers' evaluation size).
CUHK_TEST = {"images": 3074, "captions": 6156, "ids": 1000}
TINY_TEST = {"images": 24, "captions": 48, "ids": 8}
BUDGET_S = 8 * 60


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Batches(list):
    """A list of eval batches with the ``dataset.paths`` attribute ``encode_loaders`` reads."""

    def __init__(self, batches: list[dict], n_images: int) -> None:
        super().__init__(batches)
        self.dataset = SimpleNamespace(paths=[f"random/{i}.jpg" for i in range(n_images)])


def eval_batches(cfg, sizes: dict[str, int], device: torch.device, seed: int = 0) -> tuple[_Batches, _Batches]:
    """Random gallery and query batches of ``cfg.eval.batch_size`` shaped like the preset's data: each of
    ``sizes["ids"]`` identities has images and captions; caption ``i`` describes image ``i // 2``."""
    gen = torch.Generator().manual_seed(seed)
    h, w = cfg.image.img_size
    bs = cfg.eval.batch_size
    n_img, n_cap, n_ids = sizes["images"], sizes["captions"], sizes["ids"]
    image_pids = torch.arange(n_img) % n_ids
    images = [{"images": torch.randn(min(bs, n_img - s), 3, h, w, generator=gen),
               "pids": image_pids[s:s + bs]} for s in range(0, n_img, bs)]
    captions = []
    for s in range(0, n_cap, bs):
        n = min(bs, n_cap - s)
        batch = random_batch(cfg, n, torch.device("cpu"), training=False)
        index = torch.arange(s, s + n) // 2 % n_img
        batch.update(pids=image_pids[index], labels=torch.full((n,), -1), image_index=index)
        captions.append(batch)
    return _Batches(images, n_img), _Batches(captions, n_img)


def count_syncs(model, batch, optimizer, device: torch.device, clip_grad) -> int | None:
    """Host synchronisations during one training step (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    _synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(model, batch, optimizer, device, clip_grad)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    if syncs:
        print(f"    first host sync: {syncs[0].filename}:{syncs[0].lineno}: {str(syncs[0].message)[:160]}",
              file=sys.stderr)
    return len(syncs)


def check_method(method: str, preset: str, batch_size: int, steps: int, warmup: int, pool: int,
                 seconds: float, eval_sizes: dict[str, int], device: torch.device) -> dict:
    """Train ``method`` for ``steps`` steps (or ``seconds``) on a pool of random batches, then evaluate."""
    cfg = bench_config(method, preset, batch_size, {"image.pretrained": None, "text.pretrained": None})
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(model, cfg)
    batches = [random_batch(cfg, batch_size, device) for _ in range(pool)]
    losses = []
    for i in range(warmup):
        losses.append(train_step(model, batches[i % pool], optimizer, device, cfg.optim.clip_grad)["loss"].detach())
    syncs = count_syncs(model, batches[0], optimizer, device, cfg.optim.clip_grad)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    start = time.perf_counter()
    timed = 0
    while timed < steps:
        out = train_step(model, batches[(warmup + timed) % pool], optimizer, device, cfg.optim.clip_grad)
        losses.append(out["loss"].detach())  # stays on the device: no host sync in the loop
        timed += 1
        if timed % 25 == 0 and time.perf_counter() - start > seconds:  # the clock only, no sync
            break
    _synchronize(device)
    elapsed = time.perf_counter() - start
    loss = torch.stack(losses).float().cpu()
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)

    images, captions = eval_batches(cfg, eval_sizes, device)
    _synchronize(device)
    t0 = time.perf_counter()
    encoded = encode_loaders(model, images, captions, "test", device)
    t1 = time.perf_counter()
    metrics = evaluate(model, encoded)
    _synchronize(device)
    t2 = time.perf_counter()
    rescore_s = None
    if getattr(model, "can_rescore", False):
        evaluate(model, encoded, rerank=RESCORE)
        _synchronize(device)
        rescore_s = time.perf_counter() - t2
    n_edge = max(1, min(10, len(loss) // 2))
    return {"method": method, "preset": preset,
            "image": f"{cfg.image.arch} {cfg.image.img_size[0]}x{cfg.image.img_size[1]}",
            "text": f"{cfg.text.arch} L={cfg.text.max_length}", "batch": batch_size,
            "steps": warmup + (syncs is not None) + timed,
            "pairs/s": batch_size * timed / elapsed, "peak GiB": peak,
            "peak kind": "GPU allocated" if device.type == "cuda" else "process RSS (max)",
            "syncs/step": syncs, "loss start": float(loss[:n_edge].mean()), "loss end": float(loss[-n_edge:].mean()),
            "finite": bool(torch.isfinite(loss).all()), "encode s": t1 - t0, "evaluate s": t2 - t1,
            "rescore s": rescore_s, "R1 (random)": metrics["R1"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="CPU, smoke presets, batch 4, 3 steps, a 24-image gallery: seconds (CI)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--steps", type=int, default=300, help="timed training steps per method (default 300)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's data.batch_size")
    parser.add_argument("--pool", type=int, default=8, help="random batches cycled (default 8)")
    parser.add_argument("--seconds-per-method", type=float, default=None,
                        help=f"training time cap per method (default: {BUDGET_S} s shared, minus evaluation)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    methods = args.methods or list_methods()
    if args.tiny:
        device, preset, sizes = torch.device("cpu"), "smoke", TINY_TEST
        steps, warmup, pool, batch = min(args.steps, 3), min(args.warmup, 1), 2, args.batch_size or 4
    else:
        device, preset, sizes = select_device(args.device), "paper", CUHK_TEST
        steps, warmup, pool, batch = args.steps, args.warmup, args.pool, args.batch_size
        if device.type != "cuda":
            print("warning: no CUDA device; the paper presets on CPU take hours (use --tiny)", file=sys.stderr)
    seconds = args.seconds_per_method or max(10.0, (BUDGET_S - 45 * len(methods)) / len(methods))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {preset} presets, random weights, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; random batches (not rendered images); "
          f"eval {sizes['images']} images x {sizes['captions']} captions")
    rows = []
    for method in methods:
        b = batch or bench_config(method, preset, 2).data.batch_size
        rows.append(check_method(method, preset, b, steps, warmup, pool, seconds, sizes, device))
        r = rows[-1]
        print(f"  {method}: {r['pairs/s']:.1f} pairs/s, loss {r['loss start']:.3f} -> {r['loss end']:.3f}",
              file=sys.stderr)
    print("\n| method | image encoder | text encoder | batch | steps | pairs/s | peak GiB | host syncs/step "
          "| loss start → end | encode s | evaluate s | rescore s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        syncs = "n/a (CPU)" if r["syncs/step"] is None else r["syncs/step"]
        rescore = "–" if r["rescore s"] is None else f"{r['rescore s']:.2f}"
        print(f"| {r['method']} | {r['image']} | {r['text']} | {r['batch']} | {r['steps']} | {r['pairs/s']:.1f} | "
              f"{r['peak GiB']:.2f} ({r['peak kind']}) | {syncs} | {r['loss start']:.3f} → {r['loss end']:.3f} | "
              f"{r['encode s']:.2f} | {r['evaluate s']:.2f} | {rescore} |")
    bad = [r["method"] for r in rows if not r["finite"]]
    if bad:
        print(f"non-finite loss: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
