"""Caption search (tbps_lib/search.py) and `tbps search`: the search ranks as evaluation does, for default
and pairwise scoring, with and without re-ranking; bad input gives SearchInputError; torch and faiss agree."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tbps_lib import search as search_mod
from tbps_lib.analysis.retrieval import top_k
from tbps_lib.cli import main
from tbps_lib.data.loaders import build_tokenizer, prepare_dataset, train_captions
from tbps_lib.engine.evaluate import encode, rerank_similarity, similarity
from tbps_lib.engine.runs import train_or_load
from tbps_lib.models import registry
from tbps_lib.search import (RESULT_COLUMNS, CaptionSearch, GalleryIndex, SearchInputError, true_rank,
                             uses_default_scoring)
from tbps_lib.utils import seed_everything
from test_trainer import ToyConfig, ToyModel, _toy_smoke, _toy_registered, toy_config, write_toy_dataset  # noqa: F401

PAIRWISE = "toy_pairwise"


class PairwiseToy(ToyModel):
    """The toy with a pairwise scorer that ranks differently from the cosine: negative squared distance."""

    def pair_scores(self, image_feats, text_feats):
        return -torch.cdist(text_feats["global"].float(), image_feats["global"].float()).pow(2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("search") / "data")


def _searcher(cfg) -> tuple[CaptionSearch, torch.nn.Module]:
    """A randomly initialised model of ``cfg`` over its test split (no training needed)."""
    ds = prepare_dataset(cfg)
    tokenizer = build_tokenizer(cfg, train_captions(ds))
    seed_everything(0)
    model = registry.build_model(cfg).eval()
    encoded = encode(model, ds, "test", tokenizer, cfg, torch.device("cpu"))
    return CaptionSearch(model, tokenizer, encoded, name="toy/test"), model


@pytest.fixture(scope="module")
def toy(data):
    return _searcher(toy_config(data))


@pytest.fixture(scope="module")
def pairwise(data):
    registry.register_method(PAIRWISE, ToyConfig, {"smoke": _toy_smoke})(PairwiseToy)
    try:
        from tbps_lib.config import make_config

        yield _searcher(make_config(PAIRWISE, "smoke", dataset=str(data)))
    finally:
        registry._REGISTRY.pop(PAIRWISE, None)


def _same_as_evaluation(searcher: CaptionSearch, model, sim: torch.Tensor, k: int, rerank=None) -> None:
    """Every caption of the split: the search's top-k equals the evaluation matrix's row top-k."""
    scores, idx = top_k(sim, k)
    for q, caption in enumerate(searcher.encoded.captions):
        table = searcher.search(caption, k=k, rerank=rerank)
        assert table["gallery_index"].tolist() == idx[q].tolist(), (q, caption)
        np.testing.assert_allclose(table["score"].to_numpy(), scores[q].numpy(), rtol=1e-5, atol=1e-6)


def test_default_scoring_takes_the_fast_path_and_ranks_as_evaluation(toy):
    searcher, model = toy
    assert uses_default_scoring(model) and searcher.scoring == "cosine/torch"
    _same_as_evaluation(searcher, model, similarity(model, searcher.encoded), k=5)


def test_pairwise_scoring_goes_through_model_similarity(pairwise):
    searcher, model = pairwise
    assert not uses_default_scoring(model) and searcher.index is None
    assert searcher.scoring == "PairwiseToy.similarity"
    sim = similarity(model, searcher.encoded)
    # the pairwise scorer really ranks differently from the cosine on this model
    cosine = torch.nn.functional.normalize(searcher.encoded.text_feats["global"], dim=-1) @ \
        torch.nn.functional.normalize(searcher.encoded.image_feats["global"], dim=-1).T
    assert not torch.equal(top_k(sim, 3)[1], top_k(cosine, 3)[1])
    _same_as_evaluation(searcher, model, sim, k=5)


@pytest.mark.parametrize("which", ["toy", "pairwise"])
def test_visual_neighbour_reranking_equals_the_evaluation_row(which, request):
    searcher, model = request.getfixturevalue(which)
    sim = similarity(model, searcher.encoded)
    reranked = rerank_similarity(model, searcher.encoded, sim, "visual_neighbors")
    _same_as_evaluation(searcher, model, reranked, k=4, rerank="visual_neighbors")
    assert searcher.image_image() is searcher.image_image()  # computed once per gallery


def test_k_reciprocal_reranks_one_query(toy):
    searcher, _ = toy
    table = searcher.search(searcher.encoded.captions[0], k=12, rerank="k_reciprocal", rerank_params={"k1": 5, "k2": 2})
    assert sorted(table["gallery_index"]) == list(range(12))  # a full ranking of the 12 images
    assert (np.diff(table["score"].to_numpy()) <= 0).all() and table.attrs["rerank"] == "k_reciprocal"


def test_result_table_columns_truth_and_attrs(toy):
    searcher, _ = toy
    caption, pid = searcher.encoded.captions[3], int(searcher.encoded.query_pids[3])
    table = searcher.search(caption, k=5)
    assert tuple(table.columns) == RESULT_COLUMNS and table["rank"].tolist() == [1, 2, 3, 4, 5]
    gallery_pids = searcher.encoded.gallery_pids[table["gallery_index"].tolist()].tolist()
    assert table["pid"].tolist() == gallery_pids
    assert table["match"].tolist() == [p == pid for p in gallery_pids]
    assert table["image"].tolist() == [searcher.encoded.image_paths[i] for i in table["gallery_index"]]
    assert all(Path(p).is_file() for p in table["image"])
    a = table.attrs
    assert a["true_pid"] == pid and a["caption"] == caption and a["k"] == 5 and a["rerank"] is None
    assert a["latency_ms"] > 0 and a["scoring"] == "cosine/torch" and a["unknown_words"] == []
    expected = next((i + 1 for i, p in enumerate(gallery_pids) if p == pid), None)
    assert true_rank(table) == expected


def test_free_text_has_no_truth_unless_given(toy):
    searcher, _ = toy
    table = searcher.search("someone in a green shirt and red trousers", k=3)
    assert table.attrs["true_pid"] is None and table["match"].tolist() == [None] * 3 and true_rank(table) is None
    given = searcher.search("someone in a green shirt and red trousers", k=3, true_pid=int(table["pid"][0]))
    assert given["match"].tolist()[0] is True and true_rank(given) == 1


def test_k_is_clamped_to_the_gallery_and_must_be_positive(toy):
    searcher, _ = toy
    assert len(searcher.search("a red shirt", k=100)) == searcher.gallery_size == 12
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SearchInputError, match="k must be a positive integer"):
            searcher.search("a red shirt", k=bad)
    with pytest.raises(SearchInputError, match="unknown re-ranking"):
        searcher.search("a red shirt", rerank="nafs")


@pytest.mark.parametrize("caption", ["", "   ", "\n"])
def test_empty_caption_is_refused(toy, caption):
    with pytest.raises(SearchInputError, match="Type a description"):
        toy[0].search(caption)


def test_unknown_words(toy):
    searcher, _ = toy
    assert searcher.unknown_words("a person in a red shirt") == []
    assert searcher.unknown_words("a qqqz shirt with zzxq") == ["qqqz", "zzxq"]
    with pytest.raises(SearchInputError, match=r"None of the words .*'qqqz', 'zzxq'"):
        searcher.search("qqqz zzxq!")
    with pytest.raises(SearchInputError, match="None of the words"):
        searcher.search("?!")
    table = searcher.search("a qqqz red shirt", k=2)
    assert table.attrs["unknown_words"] == ["qqqz"] and len(table) == 2


def test_truth_lookup_skips_captions_of_several_people(toy):
    searcher, _ = toy
    assert searcher.truth_of(searcher.encoded.captions[0]) == int(searcher.encoded.query_pids[0])
    assert search_mod._caption_truth(["a", "a", "b", "a "], [1, 2, 3, 1]) == {"b": 3}


def test_random_query_is_reproducible(toy):
    searcher, _ = toy
    first = [searcher.random_query(np.random.default_rng(5)) for _ in range(2)]
    assert first[0] == first[1]
    caption, pid = first[0]
    assert caption in searcher.encoded.captions and pid in searcher.encoded.query_pids.tolist()


def test_gallery_index_breaks_ties_by_lower_index():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    scores, idx = GalleryIndex(gallery, backend="torch").top_k(torch.tensor([[1.0, 0.0]]), 3)
    assert idx.tolist() == [[0, 2, 3]] and torch.allclose(scores, torch.ones(1, 3))


def test_gallery_index_rejects_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="non-empty"):
        GalleryIndex(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="backend"):
        GalleryIndex(torch.ones(3, 4), backend="annoy")
    monkeypatch.setattr(search_mod, "faiss_available", lambda: False)
    with pytest.raises(ImportError, match="faiss-cpu"):
        GalleryIndex(torch.ones(3, 4), backend="faiss")
    assert GalleryIndex(torch.ones(3, 4), faiss_min=1).backend == "torch"  # auto falls back to torch


def test_faiss_and_torch_agree():
    pytest.importorskip("faiss", reason="faiss is the optional [faiss] extra (pip install faiss-cpu)")
    gen = torch.Generator().manual_seed(0)
    gallery, queries = torch.randn(5000, 32, generator=gen), torch.randn(7, 32, generator=gen)
    exact = GalleryIndex(gallery, backend="torch")
    fast = GalleryIndex(gallery, faiss_min=1000)
    assert fast.backend == "faiss" and GalleryIndex(gallery).backend == "torch"  # auto: large galleries only
    (s1, i1), (s2, i2) = exact.top_k(queries, 10), fast.top_k(queries, 10)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-5)


def test_reranking_refuses_huge_galleries(toy, monkeypatch):
    searcher, model = toy
    fresh = CaptionSearch(model, searcher.tokenizer, searcher.encoded)
    monkeypatch.setattr(search_mod, "RERANK_MAX_GALLERY", 10)
    with pytest.raises(SearchInputError, match="galleries above 10 images"):
        fresh.search("a red shirt", rerank="visual_neighbors")


# ----------------------------------------------------------------------------------------------------
# From a run, and `tbps search`


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    return train_or_load(toy_config(data), runs_dir=tmp_path_factory.mktemp("search_runs"), progress=False,
                         device="cpu")


def test_from_run_uses_the_runs_model_tokenizer_and_cached_embeddings(trained):
    searcher = CaptionSearch.from_run(trained, "test")
    assert searcher.model is trained.model and searcher.tokenizer is trained.tokenizer
    assert (trained.dir / "embeddings" / "test.pt").is_file() and searcher.gallery_size == 12
    assert searcher.name == f"{trained.name}/test" and "gallery=12" in repr(searcher)
    # a trained toy finds the person of a caption it was evaluated on as well as the evaluation did
    sim = similarity(trained.model, searcher.encoded)
    for q in range(0, searcher.encoded.n_queries, 5):
        table = searcher.search(searcher.encoded.captions[q], k=3)
        assert table["gallery_index"].tolist() == top_k(sim, 3)[1][q].tolist()


def test_cli_search_prints_the_table(trained, capsys):
    caption = CaptionSearch.from_run(trained).encoded.captions[0]
    assert main(["search", str(trained.dir), caption, "--k", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{trained.name}/test: 3 results in") and "true person" in lines[0]
    assert lines[1].split()[:5] == ["rank", "image", "pid", "score", "match"] and len(lines) == 5


def test_cli_search_json_and_reranking(trained, capsys):
    assert main(["search", str(trained.dir), "a person in a red shirt and blue trousers", "--k", "4",
                 "--rerank", "visual_neighbors", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rerank"] == "visual_neighbors" and result["true_pid"] is None
    assert [r["rank"] for r in result["results"]] == [1, 2, 3, 4]
    assert set(result["results"][0]) == set(RESULT_COLUMNS)


@pytest.mark.parametrize("args, message", [
    (["qqqz zzxq"], "None of the words"),
    ([""], "Type a description"),
    (["a red shirt", "--k", "0"], "k must be a positive integer"),
])
def test_cli_search_errors_are_one_line(trained, capsys, args, message):
    assert main(["search", str(trained.dir), *args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tbps: error: ") and message in err and "\n" not in err


def test_cli_search_missing_run(tmp_path, capsys):
    assert main(["search", str(tmp_path / "nope"), "a red shirt"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
