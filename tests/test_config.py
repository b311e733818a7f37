"""Configs are plain data: hashable, JSON round-trip, dotted overrides with type conversion, diffs."""
from __future__ import annotations

import dataclasses

import pytest

from tbps_lib.config import (RESULT_NEUTRAL_FIELDS, Config, DataConfig, OptimConfig, config_diff,
                             config_from_dict, config_hash, config_to_dict, make_config, notebook_params,
                             override, result_config)
from tbps_lib.models.base import MethodConfig, RetrievalModel
from tbps_lib.models.registry import register_method


@dataclasses.dataclass(frozen=True)
class _ToyConfig(MethodConfig):
    margin: float = 0.2
    use_decoder: bool = True


@register_method("_config_toy", _ToyConfig, presets={"smoke": lambda dataset: {"optim.lr": 0.5}})
class _Toy(RetrievalModel):
    pass


def _cfg() -> Config:
    return Config(method="_config_toy", model=_ToyConfig())


def test_hash_is_stable_and_sensitive():
    a, b = _cfg(), _cfg()
    assert hash(a) == hash(b) and config_hash(a) == config_hash(b) and len(config_hash(a)) == 12
    assert config_hash(override(a, {"model.margin": 0.3})) != config_hash(a)


def test_settings_that_do_not_change_results_stay_out_of_the_hash():
    a = _cfg()
    fast = override(a, {"data.num_workers": 4, "eval.batch_size": 17, "eval.chunk_size": 5})
    assert set(RESULT_NEUTRAL_FIELDS) == {"data.num_workers", "eval.batch_size", "eval.chunk_size"}
    assert config_hash(fast) == config_hash(a) and result_config(fast) == result_config(a) == a
    assert config_diff(a, fast, results_only=True) == [] and len(config_diff(a, fast)) == 3
    # a neighbouring field of the same sections still counts
    assert config_hash(override(a, {"data.batch_size": 17})) != config_hash(a)
    assert config_hash(override(a, {"eval.select_metric": "mAP"})) != config_hash(a)
    assert config_diff(a, override(fast, {"eval.every": 2}), results_only=True) == ["eval.every: 1 -> 2"]


def test_json_round_trip():
    cfg = override(_cfg(), {"optim.milestones": "20,40", "image.img_size": "384x128"})
    back = config_from_dict(config_to_dict(cfg))
    assert back == cfg and back.optim.milestones == (20, 40) and back.image.img_size == (384, 128)


def test_override_converts_strings_to_field_types():
    cfg = override(_cfg(), {"optim.lr": "1e-4", "optim.max_steps": "100", "model.use_decoder": "false",
                            "text.pretrained": "/models/bert", "optim.clip_grad": "none", "seed": "3"})
    assert cfg.optim.lr == 1e-4 and cfg.optim.max_steps == 100 and cfg.model.use_decoder is False
    assert cfg.text.pretrained == "/models/bert" and cfg.optim.clip_grad is None and cfg.seed == 3


@pytest.mark.parametrize("key,message", [("optim.lrr", "unknown config field 'optim.lrr'"),
                                         ("optimiser.lr", "'optimiser' is not a section"),
                                         ("model.nope", "unknown config field 'model.nope'")])
def test_override_unknown_field_is_clear(key, message):
    with pytest.raises(ValueError, match=message):
        override(_cfg(), {key: 1})


def test_override_bad_value_is_clear():
    with pytest.raises(ValueError, match="optim.epochs: expected int"):
        override(_cfg(), {"optim.epochs": "ten"})
    with pytest.raises(ValueError, match="expected a boolean"):
        override(_cfg(), {"data.flip": "maybe"})


def test_diff_names_fields():
    a = _cfg()
    b = dataclasses.replace(a, optim=OptimConfig(lr=0.1), data=DataConfig(batch_size=8))
    assert config_diff(a, b) == ["data.batch_size: 64 -> 8", "optim.lr: 0.001 -> 0.1"]
    assert config_diff(a, a) == []


def test_notebook_params(monkeypatch):
    monkeypatch.delenv("TBPS_MODE", raising=False)
    monkeypatch.delenv("TBPS_DATA", raising=False)
    monkeypatch.delenv("TBPS_BUDGET", raising=False)
    p = notebook_params()
    assert (p.mode, p.data, p.budget, p.seeds, p.changes) == ("smoke", "synthetic:cuhk-like", "full", 3, {})
    monkeypatch.setenv("TBPS_BUDGET", "ci")
    p = notebook_params()
    assert p.budget == "ci" and p.seeds == 2 and p.changes["optim.epochs"] == 1 and p.changes["optim.max_steps"] > 0
    cfg = make_config("baseline", "smoke", changes=p.changes)  # the budget's changes are valid config fields
    assert cfg.optim.epochs == 1
    assert p.default_changes == {}  # ci: the default runs of notebooks 00, 02 and 12 stay full-length
    monkeypatch.setenv("TBPS_MODE", "paper")
    assert notebook_params().changes == {} and notebook_params().seeds == 2  # never shrinks the paper settings
    monkeypatch.setenv("TBPS_BUDGET", "check")  # ... except the paper path's smoke test, made to
    p = notebook_params()
    assert p.seeds == 1 and p.changes["optim.max_steps"] == 1 and p.default_changes == p.changes
    paper = make_config("baseline", "paper", changes=p.default_changes)
    assert paper.optim.max_steps == 1 and paper.image.arch == "vit_base_patch16"  # the paper's backbones, capped
    monkeypatch.setenv("TBPS_BUDGET", "tiny")
    with pytest.raises(ValueError, match="TBPS_BUDGET must be one of"):
        notebook_params()
    monkeypatch.setenv("TBPS_MODE", "fast")
    with pytest.raises(ValueError, match="TBPS_MODE must be one of"):
        notebook_params()


def test_make_config_applies_preset_then_changes():
    from tbps_lib.config import make_config

    cfg = make_config("_config_toy", "smoke", dataset="synthetic:icfg-like", changes={"seed": 2})
    assert cfg.optim.lr == 0.5 and cfg.data.dataset == "synthetic:icfg-like" and cfg.seed == 2
    with pytest.raises(ValueError, match="has no 'paper' preset"):
        make_config("_config_toy", "paper")
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("_config_toy", "large")
    with pytest.raises(ValueError, match="unknown method 'nope'; registered methods"):
        make_config("nope")


def test_string_tuples_split_on_x_only_for_numbers():
    cfg = override(_cfg(), {"optim.freeze": "image_encoder, text_encoder", "init.skip": "classifier",
                            "image.img_size": "384x128"})
    assert cfg.optim.freeze == ("image_encoder", "text_encoder") and cfg.init.skip == ("classifier",)
    assert cfg.image.img_size == (384, 128)


def test_checkpoint_config_loads_no_pretrained_weights():
    from tbps_lib.config import checkpoint_config

    cfg = make_config("baseline", "smoke")
    assert cfg.image.pretrained.startswith("workbook:") and cfg.text.pretrained.startswith("workbook:")
    built = checkpoint_config(cfg, 979)
    assert built.image.pretrained is None and built.text.pretrained is None
    assert built.text.vocab_size == 979  # the pretrained vocabulary, held by the run's tokenizer
    scratch = override(cfg, {"image.pretrained": None, "text.pretrained": None})
    assert checkpoint_config(scratch, 979).text.vocab_size == scratch.text.vocab_size  # built with its own size
    folder = override(cfg, {"text.arch": "bert", "text.pretrained": "/models/minilm"})
    assert checkpoint_config(folder, 979).text == folder.text  # its sizes come from the folder
