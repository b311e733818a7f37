"""Loss diagnostics: what a method's training objective asks of a run's features, batch by batch.

:func:`sew_batch_diagnostic` replays the first training batches of a Sew/MCM run (the run's own sampler,
seed and tokenizer) through its selected model and reports, per batch, what Eq. (5) of the Sew paper does
under the two readings of its positive set (:func:`tbps_lib.losses.sew.sew_positive_census`): how many of
the positives are the other caption of the anchor's *own image*, how far the features are from meeting the
margins, and how large the pull term is. It answers "why do the Sew rows fall behind in smoke mode" with
numbers instead of guesses, without training anything.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import pandas as pd
import torch

from tbps_lib.data.loaders import TrainPairs, build_train_loader
from tbps_lib.losses.sew import sew_positive_census

if TYPE_CHECKING:  # pragma: no cover
    from tbps_lib.engine.runs import Run


@torch.no_grad()
def sew_batch_diagnostic(run: Run, n_batches: int = 8, epoch: int = 0) -> pd.DataFrame:
    """One line per training batch of ``epoch`` (the first ``n_batches``) of a ``sew_mcm`` run: the
    columns of :func:`~tbps_lib.losses.sew.sew_positive_census` computed on the selected model's features
    (eval mode: BatchNorm with its running statistics) with the run's margins (fixed or Eq. (10)), and
    ``batch``. ``attrs["margin"]`` / ``attrs["alpha"]`` say which were used. Trains nothing."""
    cfg = run.config
    if cfg.method != "sew_mcm":
        raise ValueError(f"sew_batch_diagnostic needs a sew_mcm run, got method {cfg.method!r} ({run.dir})")
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    local = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    pairs = TrainPairs(run.dataset, cfg.image.img_size, cfg.data.flip, cfg.seed)
    pairs.set_epoch(epoch)
    loader, sampler = build_train_loader(pairs, local, run.tokenizer)
    sampler.set_epoch(epoch)
    model = run.model
    device = next(model.parameters()).device
    lines = []
    for b, batch in enumerate(loader):
        if b >= n_batches:
            break
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        image = model.encode_images(moved["images"])["global"]
        text = model.encode_texts(moved)["global"]
        margin = model.margins(moved)
        lines.append({"batch": b, **sew_positive_census(image, text, moved["pids"], moved["image_index"], margin,
                                                        cfg.model.alpha)})
    frame = pd.DataFrame(lines)
    frame.attrs = {"margin": cfg.model.margin, "alpha": cfg.model.alpha, "run": run.name}
    return frame
