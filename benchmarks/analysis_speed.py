"""Speed of the analysis functions against the goals of issue 6; prints a Markdown table.

    python benchmarks/analysis_speed.py [--threads 2] [--repeat 3] [--seed 0] [--skip-paper]

1. ``singular_values`` (Sew Fig. 4) of 20,000 x 768 random float32 embeddings (goal <= 2 s on CPU).
2. ``tsne_map`` (Sew Fig. 6) of 2,000 points: 256-d features of 100 identities (20 points each), PCA to
   50, Barnes-Hut t-SNE (goal <= 60 s on 2 cores).
3. Heatmaps per image-caption pair on CPU (goal <= 1 s): the caption-level map (``caption_maps``, one
   pair) and the caption-level map plus 3 word-level maps (``word_maps``), for the smoke preset's
   baseline (random weights: the cost does not depend on them) and, unless ``--skip-paper``, for the
   paper preset's backbones (ViT-B/16 at 384x128 + BERT-base, 100 tokens, random weights). The plain
   forward pass of the same pair (no gradient) is timed as the floor a heatmap cannot go below.

Times are wall clock (``time.perf_counter``), best of ``--repeat`` runs after one warm-up run, with
``torch.set_num_threads(--threads)``.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch

CAPTION = ("A woman with long black hair wearing a red coat, blue jeans and white sneakers, carrying a black "
           "backpack on her back.")
WORDS = ("coat", "jeans", "backpack")


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall-clock seconds of ``repeat`` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def spectrum_case(seed: int, repeat: int) -> float:
    from tbps_lib.analysis.modality_gap import singular_values

    x = torch.randn(20000, 768, generator=torch.Generator().manual_seed(seed))
    return best_time(lambda: singular_values(x), repeat)


def tsne_case(seed: int, repeat: int) -> float:
    from tbps_lib.analysis.embedding_map import tsne_map

    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(100), 20)
    x = (rng.normal(size=(100, 256))[pids] + 0.8 * rng.normal(size=(2000, 256))).astype(np.float32)
    return best_time(lambda: tsne_map(x, seed=seed), repeat)


def heatmap_cases(preset: str, repeat: int) -> tuple[str, float, float, float]:
    """(description, seconds per pair of: the plain forward pass without gradients (the floor), the
    caption-level map, the caption-level map + 3 word maps)."""
    from tbps_lib.analysis.attention import caption_maps, text_batch, word_maps
    from tbps_lib.config import make_config
    from tbps_lib.data.text import CaptionTokenizer, caption_words
    from tbps_lib.models.registry import build_model

    changes = {} if preset == "smoke" else {"image.pretrained": None, "text.pretrained": None}
    cfg = make_config("baseline", preset, "synthetic:cuhk-like", changes)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tokenizer = CaptionTokenizer.train([CAPTION] * 4, vocab_size=200, max_length=cfg.text.max_length)
    image = torch.randn(1, 3, *cfg.image.img_size)
    words = caption_words(CAPTION)
    spans = [(words.index(w), words.index(w) + 1) for w in WORDS]
    batch = text_batch([CAPTION], tokenizer, torch.device("cpu"))

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model.pair_scores(model.encode_images(image), model.encode_texts(batch))

    plain = best_time(forward, repeat)
    caption = best_time(lambda: caption_maps(model, image, [CAPTION], tokenizer), repeat)
    per_word = best_time(lambda: word_maps(model, image[0], CAPTION, spans, tokenizer), repeat)
    h, w = cfg.image.img_size
    what = f"{cfg.image.arch} {h}x{w} + {cfg.text.arch}, {cfg.text.max_length} tokens"
    return what, plain, caption, per_word


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-paper", action="store_true", help="skip the paper-sized heatmap model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [("`singular_values`, 20,000 x 768", spectrum_case(args.seed, args.repeat), 2.0),
            ("`tsne_map`, 2,000 points (256-d, PCA 50)", tsne_case(args.seed, max(1, args.repeat - 2)), 60.0)]
    for preset in ("smoke",) if args.skip_paper else ("smoke", "paper"):
        what, plain, caption, per_word = heatmap_cases(preset, args.repeat)
        rows.append((f"reference: forward pass only, no gradient, 1 pair ({preset}: {what})", plain, float("nan")))
        rows.append((f"caption-level heatmap, 1 pair ({preset})", caption, 1.0))
        rows.append((f"caption + {len(WORDS)} word heatmaps, 1 pair ({preset})", per_word, 1.0))
    print(f"CPU, {args.threads} torch threads, best of {args.repeat} (t-SNE: {max(1, args.repeat - 2)}) after a "
          f"warm-up\n")
    print("| what | time (s) | goal (s) | met? |")
    print("|---|---:|---:|---|")
    for what, seconds, goal in rows:
        met = "-" if np.isnan(goal) else ("yes" if seconds <= goal else "no")
        print(f"| {what} | {seconds:.3f} | {'-' if np.isnan(goal) else f'{goal:g}'} | {met} |")


if __name__ == "__main__":
    main()
