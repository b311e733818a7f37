"""Training throughput: image-text pairs per second and peak memory of one optimisation step.

Runs the trainer's own ``train_step`` (autocast bf16 on CUDA, fp32 on CPU, the method's full loss, the
configured optimiser) on random batches shaped like the preset's data, after warm-up steps, and prints a
Markdown table. Data loading is not included: this measures the model, the losses and the optimiser.

    python benchmarks/train_throughput.py                        # smoke and paper presets, baseline
    python benchmarks/train_throughput.py --presets paper --batch-size 64 --steps 30   # on a GPU
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from tbps_lib.config import make_config, override
from tbps_lib.engine.trainer import build_optimizer, train_step
from tbps_lib.models import build_model
from tbps_lib.utils import select_device


#: Captions for the method's extra batch fields (noun phrases, masked phrase words): the builders of
#: ``data.loaders.BATCH_FIELDS`` run on them, so the fields have the shapes and contents a real batch has.
TEMPLATE_CAPTIONS = (
    "a woman in a red coat carrying a black backpack and wearing white shoes",
    "the man has short black hair, a blue shirt, grey trousers and brown boots",
    "a young person with a yellow umbrella walks past a green car in a long skirt",
)


def random_batch(cfg, batch_size: int, device: torch.device, training: bool = True) -> dict:
    """A batch with the keys of models/base.py: 2 pairs per identity, full-length random token ids, plus the
    fields the method asks for (``cfg.model.batch_fields(training)``) built by the library's own builders
    from template captions."""
    from tbps_lib.data.loaders import batch_field_builder
    from tbps_lib.data.text import CaptionTokenizer

    h, w = cfg.image.img_size
    length = cfg.text.max_length
    vocab = min(cfg.text.vocab_size, 30522)
    pids = torch.arange(batch_size) // 2
    captions = [TEMPLATE_CAPTIONS[i % len(TEMPLATE_CAPTIONS)] for i in range(batch_size)]
    batch = {
        "images": torch.randn(batch_size, 3, h, w),
        "input_ids": torch.randint(5, vocab, (batch_size, length)),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "token_lengths": torch.full((batch_size,), length - 2),
        "word_lengths": torch.randint(10, 41, (batch_size,)),
        "pids": pids, "labels": pids, "image_index": torch.arange(batch_size),
    }
    fields = cfg.model.batch_fields(training)
    if fields:
        tokenizer = CaptionTokenizer.train(TEMPLATE_CAPTIONS * 4, vocab_size=200, max_length=length, min_frequency=1)
        items = [{"pid": int(p), "caption": c, "draw_seed": i} for i, (p, c) in enumerate(zip(pids, captions))]
        text = {"captions": captions, **tokenizer(captions)}
        for name, params in fields.items():
            batch.update(batch_field_builder(name)(text, items, tokenizer, **dict(params)))
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["captions"] = captions
    return batch


def bench_config(method: str, preset: str, batch_size: int, changes: dict | None = None):
    """``method``'s ``preset`` config for random batches of ``batch_size`` (2 pairs per identity): the sizes
    that a dataset would resolve (classes, Sew's caption-length bounds) are set from the batch."""
    cfg = make_config(method, preset)
    fixed = {"model.num_classes": max(batch_size // 2, 2), "data.batch_size": batch_size, **(changes or {})}
    if getattr(cfg.model, "init_albef", None):  # LAIP's whole-model weights: speed does not depend on them
        fixed["model.init_albef"] = None
    if getattr(cfg.model, "t_max", None) == 0:  # Sew's caption-length bounds come from data: use the batch's
        fixed.update({"model.t_min": 10.0, "model.t_max": 40.0})
    return override(cfg, fixed)


def measure(method: str, preset: str, batch_size: int, steps: int, warmup: int, device: torch.device) -> dict:
    cfg = bench_config(method, preset, batch_size)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(model, cfg)
    batch = random_batch(cfg, batch_size, device)
    for _ in range(warmup):
        train_step(model, batch, optimizer, device, cfg.optim.clip_grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        out = train_step(model, batch, optimizer, device, cfg.optim.clip_grad)
    loss = float(out["loss"].detach())  # one host sync, after the timed loop
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"method": method, "preset": preset, "image": f"{cfg.image.arch} {cfg.image.img_size[0]}x{cfg.image.img_size[1]}",
            "text": f"{cfg.text.arch} L={cfg.text.max_length}", "batch": batch_size, "steps": steps,
            "pairs/s": batch_size * steps / elapsed, "s/step": elapsed / steps,
            "peak GiB": peak, "peak kind": "GPU allocated" if device.type == "cuda" else "process RSS (max)",
            "loss": loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="baseline")
    parser.add_argument("--presets", nargs="+", default=["smoke", "paper"])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the preset's batch on CUDA; 64 (smoke) / 8 (paper) on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 5/2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    device = select_device(args.device)
    threads = torch.get_num_threads()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu, {threads} threads'}; "
          f"torch {torch.__version__}; random initialisation (no pretrained weights needed)")
    rows = []
    for preset in args.presets:
        cpu = device.type != "cuda"
        batch = args.batch_size or (make_config(args.method, preset).data.batch_size if not cpu
                                    else (64 if preset == "smoke" else 8))
        steps = args.steps or (20 if not cpu else (5 if preset == "smoke" else 2))
        warmup = args.warmup if args.warmup is not None else (5 if not cpu else 1)
        rows.append(measure(args.method, preset, batch, steps, warmup, device))
        print(f"  {preset}: {rows[-1]['pairs/s']:.1f} pairs/s", file=sys.stderr)
    print("\n| method | preset | image encoder | text encoder | batch | pairs/s | s/step | peak GiB |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['preset']} | {r['image']} | {r['text']} | {r['batch']} | {r['pairs/s']:.1f} | "
              f"{r['s/step']:.3f} | {r['peak GiB']:.2f} ({r['peak kind']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
