"""The three official annotation readers, their validation and ``tbps data inspect``."""
from __future__ import annotations

import json

import pytest

from conftest import PATH_KEY, official_entries, write_dataset
from tbps_lib.cli import main
from tbps_lib.data.catalog import load_dataset
from tbps_lib.data.formats import DatasetError, hold_out_validation


def test_reads_each_format(official):
    fmt, root = official
    ds = load_dataset(fmt, root)
    assert ds.name == fmt
    n = len(official_entries(fmt))
    assert len(ds.records) == n and ds.report.n_skipped == 0
    assert ds.splits == (("train", "test") if fmt == "icfg-pedes" else ("train", "val", "test"))
    assert all(ds.image_path(r).is_file() for r in ds.records)
    # Training labels are contiguous from 0; evaluation keeps the original 1-based ids.
    assert sorted(ds.train_labels().values()) == [0, 1, 2]
    assert sorted({r.pid for r in ds.split("test")})[0] >= 4


def test_detects_format_from_folder(official):
    fmt, root = official
    assert load_dataset(str(root)).name == fmt


def test_stats_count_images_ids_captions(official):
    fmt, root = official
    st = load_dataset(fmt, root).stats()
    caps_per_image = 1 if fmt == "icfg-pedes" else 2
    assert st["train"] == {**st["train"], "images": 6, "ids": 3, "captions": 6 * caps_per_image}
    assert st["train"]["words_min"] == st["train"]["words_max"] == 12


def test_icfg_alternative_file_name(tmp_path):
    root = write_dataset("icfg-pedes", tmp_path, official_entries("icfg-pedes"), annotation="ICFG_PEDES.json")
    assert len(load_dataset("icfg-pedes", root).records) == 10


def test_missing_annotation_names_files_tried(tmp_path):
    tmp_path.joinpath("imgs").mkdir()
    with pytest.raises(DatasetError) as e:
        load_dataset("icfg-pedes", tmp_path)
    assert "ICFG-PEDES.json" in str(e.value) and "ICFG_PEDES.json" in str(e.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("cuhk-pedes", tmp_path / "nowhere")


BAD_CASES = [
    ("split", "dev", "unknown split 'dev'"),
    ("captions", None, "captions missing or not a non-empty list"),
    ("captions", [], "captions missing or not a non-empty list"),
    ("captions", ["fine", 3], "caption 1 is not a string"),
    ("captions", ["  "], "caption 0 is empty"),
    ("id", "7", "person id is not an integer"),
]


@pytest.mark.parametrize("fmt", ["cuhk-pedes", "rstpreid"])
@pytest.mark.parametrize("key,value,message", BAD_CASES)
def test_bad_record_strict_names_file_and_record(tmp_path, fmt, key, value, message):
    entries = official_entries(fmt)
    entries[3][key] = value
    root = write_dataset(fmt, tmp_path, entries)
    with pytest.raises(DatasetError) as e:
        load_dataset(fmt, root)
    text = str(e.value)
    assert message in text and "record 3" in text and entries[3][PATH_KEY[fmt]] in text
    assert str(root) in text


@pytest.mark.parametrize("key,value,message", BAD_CASES)
def test_bad_record_lenient_skips_and_reports(tmp_path, key, value, message):
    entries = official_entries("cuhk-pedes")
    entries[3][key] = value
    root = write_dataset("cuhk-pedes", tmp_path, entries)
    ds = load_dataset("cuhk-pedes", root, strict=False)
    assert len(ds.records) == len(entries) - 1
    assert ds.report.n_skipped == 1
    assert any(message in reason for reason in ds.report.skipped)
    assert "record 3" in ds.report.summary()


def test_missing_field(tmp_path):
    entries = official_entries("rstpreid")
    del entries[0]["img_path"]
    root = write_dataset("rstpreid", tmp_path, entries)
    with pytest.raises(DatasetError, match="missing field 'img_path'"):
        load_dataset("rstpreid", root)


def test_missing_images_counted_and_listed(tmp_path):
    entries = official_entries("cuhk-pedes")
    root = write_dataset("cuhk-pedes", tmp_path, entries)
    for e in entries[:7]:
        (root / "imgs" / e["file_path"]).unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset("cuhk-pedes", root)
    text = str(e.value)
    assert "7 image file(s) missing" in text and entries[0]["file_path"] in text and "..." in text
    ds = load_dataset("cuhk-pedes", root, strict=False)
    assert len(ds.records) == len(entries) - 7
    assert len(ds.report.skipped["missing image file"]) == 7


def test_duplicate_image_entries(tmp_path):
    entries = official_entries("cuhk-pedes")
    entries.append(dict(entries[2]))
    root = write_dataset("cuhk-pedes", tmp_path, entries)
    with pytest.raises(DatasetError, match=r"duplicate image entry \(first at record 2\)"):
        load_dataset("cuhk-pedes", root)
    assert len(load_dataset("cuhk-pedes", root, strict=False).records) == len(entries) - 1


def test_non_ascii_captions_load(tmp_path):
    entries = official_entries("rstpreid")
    entries[0]["captions"] = ["A woman in a beige café-style coat — carrying a bag “tote”.", "naïve caption"]
    root = write_dataset("rstpreid", tmp_path, entries)
    assert load_dataset("rstpreid", root).records[0].captions[0].startswith("A woman in a beige café")


def test_not_a_list_and_bad_json(tmp_path):
    (tmp_path / "reid_raw.json").write_text('{"a": 1}')
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_dataset("cuhk-pedes", tmp_path)
    (tmp_path / "reid_raw.json").write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset("cuhk-pedes", tmp_path)


def test_unknown_dataset_and_split(official):
    fmt, root = official
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("market-1501")
    with pytest.raises(DatasetError, match="needs a root"):
        load_dataset(fmt)
    with pytest.raises(DatasetError, match="no split 'query'"):
        load_dataset(fmt, root).split("query")


def test_hold_out_validation_is_fixed_and_reported(tmp_path):
    entries = official_entries("icfg-pedes")
    for pid in range(10, 30):  # more training identities
        entries.append({"id": pid, "file_path": f"train/{pid}.png", "captions": ["a man"], "split": "train"})
    root = write_dataset("icfg-pedes", tmp_path, entries)
    ds = hold_out_validation(load_dataset("icfg-pedes", root), share=0.25, seed=1)
    val_ids = {r.pid for r in ds.split("val")}
    assert len(val_ids) == round(0.25 * 23) and not val_ids & {r.pid for r in ds.split("train")}
    assert val_ids == {r.pid for r in hold_out_validation(load_dataset("icfg-pedes", root), 0.25, 1).split("val")}
    assert "held out as 'val'" in ds.report.summary()


def test_cli_inspect_json(official, capsys):
    fmt, root = official
    assert main(["data", "inspect", "--dataset", fmt, "--root", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"] == {"images": 6, "ids": 3, "captions": 6 if fmt == "icfg-pedes" else 12}
    assert set(out) == ({"train", "test"} if fmt == "icfg-pedes" else {"train", "val", "test"})


def test_cli_inspect_table(official, capsys):
    fmt, root = official
    assert main(["data", "inspect", "--dataset", fmt, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "split" in out and "train" in out and "12.0±0.0" in out


@pytest.mark.parametrize("key,value,message", BAD_CASES[:2])
def test_cli_inspect_bad_input_is_one_clear_line(tmp_path, capsys, key, value, message):
    entries = official_entries("cuhk-pedes")
    entries[1][key] = value
    root = write_dataset("cuhk-pedes", tmp_path, entries)
    assert main(["data", "inspect", "--dataset", "cuhk-pedes", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tbps: error:") and message in err and "Traceback" not in err
    assert main(["data", "inspect", "--dataset", "cuhk-pedes", "--root", str(root), "--lenient"]) == 0
    assert "skipped 1" in capsys.readouterr().out


def test_duplicate_ids_across_splits(tmp_path):
    from tbps_lib.data.formats import duplicate_ids_across_splits

    entries = official_entries("cuhk-pedes")
    assert duplicate_ids_across_splits(load_dataset("cuhk-pedes", write_dataset("cuhk-pedes", tmp_path / "a", entries))) == {}
    entries[-1]["id"] = 1  # a test image of training person 1
    ds = load_dataset("cuhk-pedes", write_dataset("cuhk-pedes", tmp_path / "b", entries))
    assert duplicate_ids_across_splits(ds) == {1: ["test", "train"]}
