"""Two-stage inference (RetrievalModel.rescore, rerank="rescore"): metrics on the re-scored ranking against a
hand computation, chunking that bounds the pairs per call, search and Run.evaluate, and a clear error for
models without a second stage."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tbps_lib.engine.evaluate import Encoded, evaluate, rescore_topk, rescored_ranking
from tbps_lib.models.base import RescoreNotSupported, RetrievalModel


class FixedScores(RetrievalModel):
    """First stage: the score rows stored in ``text_feats["sims"]``. With ``invert``, the second stage
    re-scores each candidate by minus its first-stage score (it inverts the order of the top-k)."""

    def __init__(self, rescore_k: int = 3, rescore_pairs: int = 2048) -> None:
        super().__init__(SimpleNamespace(eval=SimpleNamespace(chunk_size=1024, rescore_k=rescore_k,
                                                              rescore_pairs=rescore_pairs)))
        self.weight = nn.Parameter(torch.zeros(1))

    def pair_scores(self, image_feats, text_feats):
        return text_feats["sims"].float()


class Inverting(FixedScores):
    def rescore(self, image_feats, text_feats, candidates):
        return -text_feats["sims"].gather(1, candidates)


def _encoded(sims: list[list[float]], query_pids: list[int], gallery_pids: list[int]) -> Encoded:
    sims_t = torch.tensor(sims)
    n, g = sims_t.shape
    return Encoded(split="test", image_feats={"global": torch.eye(g)}, text_feats={"sims": sims_t},
                   query_pids=torch.tensor(query_pids), gallery_pids=torch.tensor(gallery_pids),
                   image_paths=[f"{i}.jpg" for i in range(g)], captions=[f"c{q}" for q in range(n)],
                   query_image_index=torch.tensor(query_pids))


# Query 0 (person 0): first stage [0, 1, 2, 3] puts its image first; the top-3 inverted -> [2, 1, 0, 3]: rank 3.
# Query 1 (person 1): first stage [3, 0, 2, 1] puts its image 4th, outside the top-3; re-scored
# [2, 0, 3] then the rest [1]: still rank 4.
SIMS = [[0.9, 0.8, 0.7, 0.1], [0.5, 0.1, 0.3, 0.6]]
PIDS = dict(query_pids=[0, 1], gallery_pids=[0, 1, 2, 3])


def test_inverted_top_k_changes_the_metrics_as_computed_by_hand():
    enc = _encoded(SIMS, **PIDS)
    ks = (1, 2, 3)
    before = evaluate(Inverting(), enc, ks=ks)
    after = evaluate(Inverting(), enc, rerank="rescore", ks=ks)
    assert after.pop("rerank") == "rescore"  # the re-ranked result names its re-ranking
    # before: ranks 1 and 4 -> R1 = R2 = R3 = 50, AP = INP = (1 + 1/4) / 2
    assert before == pytest.approx({"R1": 50.0, "R2": 50.0, "R3": 50.0, "mAP": 62.5, "mINP": 62.5})
    # after: ranks 3 and 4 -> R1 = R2 = 0, R3 = 50, AP = INP = (1/3 + 1/4) / 2
    assert after == pytest.approx({"R1": 0.0, "R2": 0.0, "R3": 50.0, "mAP": 100 * 7 / 24, "mINP": 100 * 7 / 24})
    # k from rerank_params overrides eval.rescore_k: k = 4 inverts whole rows -> ranks 4 and 1
    full = evaluate(Inverting(), enc, rerank="rescore", rerank_params={"k": 4}, ks=ks)
    full.pop("rerank")
    assert full == pytest.approx({"R1": 50.0, "R2": 50.0, "R3": 50.0, "mAP": 62.5, "mINP": 62.5})
    one = evaluate(Inverting(), _encoded(SIMS[1:], query_pids=[1], gallery_pids=PIDS["gallery_pids"]),
                   rerank="rescore", rerank_params={"k": 4}, ks=ks)
    assert one["R1"] == pytest.approx(100.0)


def test_rescored_ranking_order():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.75]])
    cand = torch.tensor([[0, 1, 4]])
    ranking = rescored_ranking(sim, cand, torch.tensor([[0.2, 0.5, 0.5]]))
    # candidates first by second-stage score (tie 1 vs 4 keeps first-stage order), then 2 and 3 as before
    assert ranking[0].argsort(descending=True, stable=True).tolist() == [1, 4, 0, 2, 3]
    assert torch.equal(ranking[0, [2, 3]], sim[0, [2, 3]])


def test_models_without_rescore_raise_a_clear_error():
    model = FixedScores()
    assert not model.can_rescore and Inverting().can_rescore
    with pytest.raises(RescoreNotSupported, match="FixedScores has no second-stage scorer.*rescore"):
        evaluate(model, _encoded(SIMS, **PIDS), rerank="rescore")
    with pytest.raises(NotImplementedError):  # RescoreNotSupported is a NotImplementedError
        model.rescore({}, {}, torch.zeros(1, 1, dtype=torch.long))


def test_bad_rescore_k_names_the_field():
    with pytest.raises(ValueError, match="eval.rescore_k"):
        evaluate(Inverting(rescore_k=0), _encoded(SIMS, **PIDS), rerank="rescore")


class PairwiseHead(RetrievalModel):
    """A fake pairwise head: gathers each candidate's image tokens ([pairs, T, D], as a cross-attention head
    does) and records the pairs and bytes of every call."""

    def __init__(self, rescore_pairs: int) -> None:
        super().__init__(SimpleNamespace(eval=SimpleNamespace(rescore_k=128, rescore_pairs=rescore_pairs)))
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, int]] = []  # (pairs, bytes of the gathered tokens)
        self.rows_seen = 0

    def rescore(self, image_feats, text_feats, candidates):
        tokens = image_feats["tokens"][candidates]  # [n_texts, k, T, D]
        self.calls.append((candidates.numel(), tokens.numel() * tokens.element_size()))
        self.rows_seen += candidates.shape[0]
        return torch.einsum("nktd,nd->nk", tokens, text_feats["global"])


def test_cuhk_sized_rescoring_is_chunked_to_the_pair_budget():
    """6,156 queries x top-128 of 3,074 images: no call sees more than eval.rescore_pairs pairs, every query is
    re-scored once, and the working set (scores, candidates, one call's gathered tokens) fits in 4 GB even
    with ViT-B/16-at-384 sized tokens (577 x 768 float32 per image)."""
    n_q, n_g, k, pairs, t, d = 6156, 3074, 128, 512, 2, 4
    gen = torch.Generator().manual_seed(0)
    head = PairwiseHead(rescore_pairs=pairs)
    image_feats = {"tokens": torch.randn(n_g, t, d, generator=gen)}
    text_feats = {"global": torch.randn(n_q, d, generator=gen)}
    sim = torch.randn(n_q, n_g, generator=gen)
    cand, scores = rescore_topk(head, image_feats, text_feats, sim)
    assert cand.shape == scores.shape == (n_q, k) and head.rows_seen == n_q
    assert max(p for p, _ in head.calls) == pairs and len(head.calls) == -(-n_q // (pairs // k))
    assert torch.equal(cand[:5], sim[:5].topk(k, dim=1).indices)
    per_pair_paper = 577 * 768 * 4
    working = 2 * sim.numel() * 4 + cand.numel() * (8 + 4) + pairs * per_pair_paper
    assert working < 4 * 2**30, working / 2**30
    assert max(b for _, b in head.calls) == pairs * t * d * 4  # what the head gathered, per call


# ----------------------------------------------------------------------------------------------------
# CaptionSearch and Run.evaluate with a trained toy


def _inverting_rescore(self, image_feats, text_feats, candidates):
    """Second stage for the toy: minus the cosine (inverts the first-stage order of the top-k)."""
    t = torch.nn.functional.normalize(text_feats["global"].float(), dim=-1)
    i = torch.nn.functional.normalize(image_feats["global"].float(), dim=-1)[candidates]
    return -torch.einsum("nd,nkd->nk", t, i)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from tbps_lib.engine.runs import train_or_load
    from tbps_lib.models import registry
    from test_trainer import TOY, register_toy, toy_config, write_toy_dataset

    register_toy()
    data = write_toy_dataset(tmp_path_factory.mktemp("rescore") / "data")
    try:
        yield train_or_load(toy_config(data), runs_dir=tmp_path_factory.mktemp("runs"), progress=False, device="cpu")
    finally:
        registry._REGISTRY.pop(TOY, None)


def test_run_evaluate_and_search_rescore(toy_run, monkeypatch):
    from tbps_lib.engine.evaluate import similarity
    from tbps_lib.search import CaptionSearch, SearchInputError

    run = toy_run
    with pytest.raises(RescoreNotSupported, match="ToyModel"):
        run.evaluate("test", rerank="rescore")
    searcher = CaptionSearch.from_run(run, "test")
    with pytest.raises(SearchInputError, match="no second-stage scorer"):
        searcher.search(searcher.encoded.captions[0], rerank="rescore")

    monkeypatch.setattr(type(run.model), "rescore", _inverting_rescore, raising=False)
    assert run.model.can_rescore
    enc = run.embeddings("test")
    sim = similarity(run.model, enc)
    k = 4
    plain = run.evaluate("test")
    rescored = run.evaluate("test", rerank="rescore", rerank_params={"k": k})
    cand, scores = rescore_topk(run.model, enc.image_feats, enc.text_feats, sim, k=k)
    ranking = rescored_ranking(sim, cand, scores)
    assert rescored != plain  # inverting the top-4 of a trained model moves its hits
    for q in range(0, enc.n_queries, 5):
        table = searcher.search(enc.captions[q], k=6, rerank="rescore", rerank_params={"k": k})
        assert table["gallery_index"].tolist() == ranking[q].topk(6).indices.tolist()
        assert table.attrs["rescored"] == k
        # the re-scored ranks show the second-stage score, the inverted first-stage order
        assert table["score"].iloc[:k].tolist() == pytest.approx(sorted(scores[q].tolist(), reverse=True), abs=1e-5)
        assert table["gallery_index"].tolist()[:k] == cand[q].flip(0).tolist()
