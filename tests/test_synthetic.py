"""The synthetic benchmark: layout, determinism, splits, caption truthfulness, masks, presets, cache.

Datasets here are tiny (tens of identities) so the module runs in seconds on a 2-core CPU.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tbps_lib.data import synthetic
from tbps_lib.data import synthetic_attributes as attrs
from tbps_lib.data import synthetic_captions as capmod
from tbps_lib.data.catalog import load_dataset
from tbps_lib.data.formats import DatasetError, read_synthetic
from tbps_lib.data.synthetic_render import PART_LABELS

# Words that name each slot, written out by hand (independent of the generator's own tables).
SLOT_NOUNS = {
    "hair": {"hair", "ponytail", "bald"},
    "headwear": {"cap", "beanie", "hat"},
    "eyewear": {"glasses", "eyeglasses", "spectacles", "sunglasses", "shades"},
    "upper": {"t-shirt", "tee", "tshirt", "shirt", "blouse", "jacket", "coat", "overcoat", "hoodie",
              "sweatshirt", "sweater", "jumper", "pullover", "dress"},
    "lower": {"jeans", "pants", "trousers", "slacks", "shorts", "skirt", "leggings", "tights"},
    "shoes": {"sneakers", "trainers", "shoes", "boots", "sandals", "heels"},
    "bag": {"backpack", "rucksack", "knapsack", "handbag", "purse", "bag", "suitcase", "case"},
    "held": {"umbrella", "phone", "smartphone", "cup"},
}
# Words that name exactly one garment/object type, with the attribute value they imply.
TYPE_WORDS = {
    "jacket": ("upper", "jacket"), "coat": ("upper", "coat"), "hoodie": ("upper", "hoodie"),
    "sweater": ("upper", "sweater"), "jeans": ("lower", "jeans"), "skirt": ("lower", "skirt"),
    "shorts": ("lower", "shorts"), "leggings": ("lower", "leggings"), "sneakers": ("shoes", "sneakers"),
    "boots": ("shoes", "boots"), "sandals": ("shoes", "sandals"), "heels": ("shoes", "heels"),
    "backpack": ("bag", "backpack"), "handbag": ("bag", "handbag"), "suitcase": ("bag", "suitcase"),
    "umbrella": ("held", "umbrella"), "beanie": ("headwear", "beanie"), "sunglasses": ("eyewear", "sunglasses"),
}


def _words(caption: str) -> set[str]:
    return set(capmod.tokens(caption))


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory) -> Path:
    """A small cuhk-like set, generated once for the module with two worker processes."""
    return synthetic.generate("cuhk-like", tmp_path_factory.mktemp("syn") / "cuhk", seed=3, ids=120,
                              progress=False, workers=2)


@pytest.fixture(scope="module")
def loaded(cuhk):
    return read_synthetic(cuhk)


def test_layout_and_reader_round_trip(cuhk, loaded):
    raw = json.loads((cuhk / "reid_raw.json").read_text())
    assert len(loaded.records) == len(raw) > 300
    by_path = {e["file_path"]: e for e in raw}
    for rec in loaded.records:
        e = by_path[rec.image]
        assert rec.pid == e["id"] and rec.split == e["split"] and list(rec.captions) == e["captions"]
        assert e["processed_tokens"] == [capmod.tokens(c) for c in e["captions"]]
        assert all(t == t.lower() and t.strip(".,") == t for toks in e["processed_tokens"] for t in toks)
        assert rec.meta is not None and rec.meta["mask"].startswith("masks/")
        with Image.open(loaded.image_path(rec)) as img:
            assert img.size == (64, 128) and img.mode == "RGB"
    assert sorted({e["id"] for e in raw}) == list(range(1, 121))  # 1-based, contiguous
    assert load_dataset(str(cuhk)).name == "synthetic"  # format detected from the sidecar


def test_identities_disjoint_across_splits(loaded):
    where = defaultdict(set)
    for r in loaded.records:
        where[r.pid].add(r.split)
    assert all(len(s) == 1 for s in where.values())
    assert set(loaded.splits) == {"train", "val", "test"}
    assert {s: len({r.pid for r in loaded.split(s)}) for s in loaded.splits} == {"train": 96, "val": 12, "test": 12}


@pytest.mark.parametrize("preset,n,expected", [
    ("cuhk-like", 13003, {"train": 11003, "val": 1000, "test": 1000}),
    ("icfg-like", 4102, {"train": 3102, "test": 1000}),
    ("rstp-like", 4101, {"train": 3701, "val": 200, "test": 200}),
    ("cuhk-like", 1000, {"train": 800, "val": 100, "test": 100}),
])
def test_split_sizes_match_the_real_datasets_at_full_size(preset, n, expected):
    assert synthetic.split_sizes(synthetic.PRESETS[preset], n) == expected


def test_generation_is_deterministic_and_independent_of_workers(tmp_path):
    a = synthetic.generate("rstp-like", tmp_path / "a", seed=7, ids=15, progress=False, workers=1)
    b = synthetic.generate("rstp-like", tmp_path / "b", seed=7, ids=15, progress=False, workers=2)
    c = synthetic.generate("rstp-like", tmp_path / "c", seed=8, ids=15, progress=False, workers=1)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files_a) == 2 * 75 + 2  # images + masks + the two JSON files
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "reid_raw.json").read_bytes() != (c / "reid_raw.json").read_bytes()


def test_captions_mention_only_visible_slots(loaded):
    n_checked = 0
    for rec in loaded.records:
        meta = rec.meta
        visible = set(meta["visible"])
        for cap, said in zip(rec.captions, meta["mentioned"]):
            words = _words(cap)
            for slot, nouns in SLOT_NOUNS.items():
                if slot not in visible:
                    assert not words & nouns, (rec.image, slot, cap, sorted(visible))
            assert set(said) <= visible and len(said) >= 3, (rec.image, said, sorted(visible))
            n_checked += 1
    assert n_checked == sum(len(r.captions) for r in loaded.records)


def test_captions_tell_the_truth_about_types(loaded):
    """A word that names one garment type only appears when the person wears that type."""
    for rec in loaded.records:
        a = rec.meta["attributes"]
        for cap in rec.captions:
            for word in _words(cap) & set(TYPE_WORDS):
                slot, value = TYPE_WORDS[word]
                assert a[slot] == value, (rec.image, word, a[slot], cap)
            if {"man", "gentleman", "guy"} & _words(cap):
                assert a["gender"] == "male", cap
            if {"woman", "lady", "girl"} & _words(cap):
                assert a["gender"] == "female", cap


def test_views_change_what_is_visible(loaded):
    metas = [r.meta for r in loaded.records]
    back = [m for m in metas if m["view"] == "back"]
    front_backpack = [m for m in metas if m["view"] == "front" and m["attributes"]["bag"] == "backpack"]
    back_backpack = [m for m in back if m["attributes"]["bag"] == "backpack" and not m["occluder"]]
    assert back and front_backpack and back_backpack
    assert all("eyewear" not in m["visible"] for m in back)  # glasses only from the front or side
    assert all("bag" not in m["visible"] for m in front_backpack)  # a backpack hides behind the body
    assert sum("bag" in m["visible"] for m in back_backpack) >= 0.9 * len(back_backpack)


def test_masks_and_boxes_agree(cuhk, loaded):
    labels = set(PART_LABELS.values())
    for rec in loaded.records[:120]:
        meta = rec.meta
        mask = synthetic.load_mask(cuhk, meta)
        assert mask.shape == (128, 64) and set(np.unique(mask)) <= labels
        present = {name for name, lab in PART_LABELS.items() if lab and (mask == lab).any()}
        assert set(meta["boxes"]) == present, rec.image
        for name, (x0, y0, x1, y1) in meta["boxes"].items():
            ys, xs = np.nonzero(mask == PART_LABELS[name])
            assert [x0, y0, x1, y1] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], (rec.image, name)
        for slot in meta["visible"]:
            if slot != "gender" and not (slot == "hair" and meta["attributes"]["hair_length"] == "bald"):
                assert slot in meta["boxes"], (rec.image, slot)
        if "head" in meta["boxes"] and "shoes" in meta["boxes"]:
            assert meta["boxes"]["head"][3] <= meta["boxes"]["shoes"][1]  # head above feet


def test_mask_marks_the_person_pixels(cuhk, loaded):
    """Inside the upper-garment mask the image has the garment's colour (up to lighting), not the scene's."""
    close, total = 0, 0
    for rec in loaded.records:
        m = rec.meta
        if m["attributes"]["upper_pattern"] != "solid" or "upper" not in m["visible"]:
            continue
        mask = synthetic.load_mask(cuhk, m)
        img = np.asarray(Image.open(loaded.image_path(rec)), dtype=float)
        inner = (mask == PART_LABELS["upper"])
        got = np.median(img[inner], axis=0)
        want = np.asarray(m["appearance"]["rgb"]["upper_color"], dtype=float)
        others = np.median(img[mask == 0], axis=0)
        total += 1
        close += np.abs(got - want).mean() < np.abs(others - want).mean()
    assert total > 50 and close / total > 0.8


def _torso_histogram(img: np.ndarray, box: list[int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    px = img[y0:y1, x0:x1].reshape(-1, 3).astype(float)
    bins = np.floor(px / 64.0).astype(int).clip(0, 3)
    hist = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64).astype(float)
    chroma = px / (px.sum(1, keepdims=True) + 1.0)
    return np.concatenate([hist / hist.sum(), px.mean(0) / 255.0, chroma.mean(0)])


def test_learnability_upper_colour_from_torso_histograms(tmp_path):
    """The images carry what captions say: torso colour histograms recover the upper-garment colour.

    Independent people (difficulty 0) so that look-alike families do not make the small splits
    unrepresentative; trained on the train split, tested on val + test (other people).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    loaded = read_synthetic(synthetic.generate("cuhk-like", tmp_path / "l", seed=3, ids=200, difficulty=0.0,
                                               progress=False))

    def features(split):
        xs, ys = [], []
        for rec in loaded.split(split):
            if "upper" in rec.meta["boxes"]:
                img = np.asarray(Image.open(loaded.image_path(rec)))
                xs.append(_torso_histogram(img, rec.meta["boxes"]["upper"]))
                ys.append(rec.meta["attributes"]["upper_color"])
        return np.array(xs), np.array(ys)

    x_tr, y_tr = features("train")
    x_te, y_te = [np.concatenate(v) for v in zip(features("val"), features("test"))]
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(x_tr), y_tr)
    acc = float((clf.predict(scaler.transform(x_te)) == y_te).mean())
    majority = Counter(y_tr).most_common(1)[0][1] / len(y_tr)
    chance = max(majority, 1.0 / len(attrs.COLORS))
    assert acc > 0.5 and acc > 2 * chance, (acc, chance)


def test_caption_length_grows_with_mentioned_slots(loaded):
    n = [len(s) for r in loaded.records for s in r.meta["mentioned"]]
    words = [len(c.split()) for r in loaded.records for c in r.captions]
    assert np.corrcoef(n, words)[0, 1] > 0.5
    assert len(set(n)) >= 4  # informativeness varies


@pytest.mark.parametrize("name", sorted(synthetic.PRESETS))
def test_preset_statistics(name, tmp_path):
    preset = synthetic.PRESETS[name]
    ds = read_synthetic(synthetic.generate(name, tmp_path / name, ids=50, progress=False, workers=2))
    ids = {r.pid for r in ds.records}
    per_id = len(ds.records) / len(ids)
    lo, hi = preset.mean_images_per_id() * 0.75, preset.mean_images_per_id() * 1.25
    assert lo <= per_id <= hi, per_id
    assert all(len(r.captions) == preset.captions_per_image for r in ds.records)
    words = np.mean([len(c.split()) for r in ds.records for c in r.captions])
    assert preset.words[0] <= words <= preset.words[1], words
    assert set(ds.splits) == set(preset.splits)
    assert min(len(c.split()) for r in ds.records for c in r.captions) >= preset.min_words
    if name == "rstp-like":  # five images from five different cameras
        cams = defaultdict(list)
        for r in ds.records:
            cams[r.pid].append(r.meta["camera"])
        assert all(len(c) == 5 == len(set(c)) for c in cams.values())


def test_presets_differ_in_caption_style_and_cameras(tmp_path):
    a = read_synthetic(synthetic.generate("cuhk-like", tmp_path / "a", ids=25, progress=False))
    b = read_synthetic(synthetic.generate("icfg-like", tmp_path / "b", ids=25, progress=False))
    style_a = Counter(s for r in a.records for s in r.meta["styles"])
    style_b = Counter(s for r in b.records for s in r.meta["styles"])
    assert not set(style_a) & set(style_b)
    cams_a = synthetic.read_meta(a.root)["cameras"]
    cams_b = synthetic.read_meta(b.root)["cameras"]
    assert [c["scene"] for c in cams_a] != [c["scene"] for c in cams_b[:len(cams_a)]]
    assert cams_a[0]["tone"] != cams_b[0]["tone"]  # each camera network has its own colour response

    def share(ds, word, other):  # how often annotators say `word` rather than `other`
        words = Counter(w for r in ds.records for c in r.captions for w in capmod.tokens(c))
        return words[word] / max(1, words[word] + words[other])

    assert share(b, "trousers", "pants") > 0.5 > share(a, "trousers", "pants")


@pytest.mark.parametrize("name", sorted(synthetic.PRESETS))
def test_preset_lexicons_name_real_synonyms(name):
    tables = [*capmod.NOUNS.values(), capmod.COLOR_WORDS, capmod.HAIR_COLOR_WORDS]
    synonym_sets = [syn for table in tables for syn in table.values()]
    for usual, preferred in synthetic.PRESETS[name].lexicon:
        assert any(syn[0] == usual and preferred in syn for syn in synonym_sets), (usual, preferred)


def test_difficulty_makes_neighbours_closer():
    def mean_shared(d: float) -> float:
        people = attrs.sample_identities(np.random.default_rng(0), 300, d)
        keys = [k for k in people[0] if k != "appearance"]
        return float(np.mean([sum(p[k] == q[k] for k in keys) for p, q in zip(people, people[1:])]))

    easy, mid, hard = mean_shared(0.0), mean_shared(0.5), mean_shared(1.0)
    assert easy < mid < hard
    assert hard - easy > 4  # at difficulty 1 neighbours share several more attributes


def test_identities_are_distinct():
    people = attrs.sample_identities(np.random.default_rng(1), 500, 1.0)
    assert len({attrs.signature(p) for p in people}) == 500


def test_other_sizes(tmp_path):
    root = synthetic.generate("cuhk-like", tmp_path / "big", ids=3, size=(384, 128), progress=False)
    ds = read_synthetic(root)
    rec = ds.records[0]
    with Image.open(ds.image_path(rec)) as img:
        assert img.size == (128, 384)
    assert synthetic.load_mask(root, rec.meta).shape == (384, 128)
    meta = synthetic.read_meta(root)
    assert meta["size"] == [384, 128] and meta["preset"] == "cuhk-like" and meta["part_labels"] == PART_LABELS


@pytest.mark.parametrize("kwargs,message", [
    ({"preset": "market-like"}, "unknown synthetic preset 'market-like'"),
    ({"size": (20, 10)}, "height >= 32"),
    ({"size": "128x64"}, "size must be (height, width) in pixels"),
    ({"size": (64, 128)}, "height/width"),
    ({"difficulty": 1.5}, "difficulty must be in [0, 1]"),
    ({"ids": 2}, "needs at least 3 identities"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    args = {"preset": "cuhk-like", "out": tmp_path / "x", "ids": 5, "progress": False, **kwargs}
    with pytest.raises(ValueError) as e:
        synthetic.generate(**args)
    assert message in str(e.value)


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        synthetic.generate("cuhk-like", tmp_path, ids=5, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_sidecar_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="synthetic_meta.json"):
        synthetic.read_sidecar(tmp_path)
    (tmp_path / "synthetic_meta.json").write_text(json.dumps({"version": 99, "images": {}}))
    with pytest.raises(DatasetError, match="expected sidecar version 1, found 99"):
        synthetic.read_sidecar(tmp_path)


def test_ensure_synthetic_caches_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    root = synthetic.ensure_synthetic("icfg-like", seed=2, ids=4)
    assert root.parent == tmp_path / "cache" / "synthetic"
    assert root.name == "icfg-like-seed2-ids4-128x64-d0.5-v1" == synthetic.cache_name("icfg-like", 2, 4)
    stamp = (root / "synthetic_meta.json").stat().st_mtime_ns
    assert synthetic.ensure_synthetic("icfg-like", seed=2, ids=4, difficulty=0.5) == root
    assert (root / "synthetic_meta.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary folders left
    other = synthetic.ensure_synthetic("icfg-like", seed=2, ids=4, cache_dir=tmp_path / "elsewhere")
    assert other.parent == tmp_path / "elsewhere"


def test_ensure_synthetic_rejects_an_incomplete_folder(tmp_path):
    (tmp_path / synthetic.cache_name("cuhk-like", 0, 4)).mkdir()
    with pytest.raises(ValueError, match="incomplete"):
        synthetic.ensure_synthetic("cuhk-like", ids=4, cache_dir=tmp_path)


def _ensure_in_child(cache: str) -> str:
    return str(synthetic.ensure_synthetic("cuhk-like", seed=5, ids=4, cache_dir=cache, progress=False))


def test_ensure_synthetic_is_safe_when_two_processes_race(tmp_path):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(2) as pool:
        roots = pool.map(_ensure_in_child, [str(tmp_path)] * 2)
    assert roots[0] == roots[1]
    root = Path(roots[0])
    assert [p.name for p in tmp_path.iterdir()] == [root.name]
    assert len(read_synthetic(root).records) > 0


def test_load_dataset_generates_a_synthetic_preset_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    small = dataclasses.replace(synthetic.PRESETS["rstp-like"], default_ids=4)
    monkeypatch.setitem(synthetic.PRESETS, "rstp-like", small)
    ds = load_dataset("synthetic:rstp-like")
    assert ds.name == "synthetic" and len(ds.records) == 20
    assert all(r.meta is not None and "attributes" in r.meta for r in ds.records)
    assert (tmp_path / "synthetic" / "rstp-like-seed0-ids4-128x64-d0.5-v1").is_dir()


def test_cli_writes_a_dataset(tmp_path, capsys):
    from tbps_lib.cli import main

    out = tmp_path / "cli"
    assert main(["data", "synth", "--preset", "rstp-like", "--out", str(out), "--ids", "3", "--quiet"]) == 0
    assert len(json.loads((out / "reid_raw.json").read_text())) == 15
    assert main(["data", "synth", "--preset", "nope", "--out", str(tmp_path / "n"), "--ids", "3"]) == 2
    assert "unknown synthetic preset 'nope'" in capsys.readouterr().err


def test_mentioned_slots_and_tokens_known_answers():
    cap = "A woman in a red T-shirt and blue jeans, carrying a black shoulder bag. She's walking."
    assert capmod.mentioned_slots(cap) == {"upper", "lower", "bag"}
    assert capmod.tokens(cap)[:5] == ["a", "woman", "in", "a", "red"]
    assert "t-shirt" in capmod.tokens(cap) and "she's" in capmod.tokens(cap)


def test_write_caption_respects_visibility_and_minimum_length():
    people = attrs.sample_identities(np.random.default_rng(4), 20, 0.5)
    ident = next(p for p in people if p["lower"] is not None)
    style = capmod.STYLES["terse"]
    for seed in range(30):
        text, said = capmod.write_caption(ident, ["gender", "upper", "lower", "shoes"], style,
                                          np.random.default_rng(seed), scene="mall", min_words=23)
        assert set(said) <= {"upper", "lower", "shoes"} and len(said) == 3
        assert len(text.split()) >= 23
        assert not capmod.mentioned_slots(text) - {"upper", "lower", "shoes"}
    dress = next(p for p in people if p["upper"] == "dress")
    with pytest.raises(ValueError, match=r"\['lower'\] are marked visible but the person has none"):
        capmod.write_caption(dress, ["upper", "lower", "shoes"], style, np.random.default_rng(0))


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` shrunk by one pixel (4-neighbourhood), image borders count as outside."""
    m = np.pad(mask, 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def test_rerender_reproduces_the_stored_images_and_swaps_one_layer(cuhk, loaded):
    """rerender without options = the stored image and mask; a scene swap keeps the person's pixels (the
    cameras made sharp, so no blur carries the new scene over the silhouette) and changes the scene's; a
    person swap keeps the scene's pixels and changes the person's."""
    meta = synthetic.read_meta(cuhk)
    rels = [r.image for r in loaded.split("test")][:6]
    for rel in rels:
        again = synthetic.rerender(meta, rel)
        assert np.array_equal(again.image, np.asarray(Image.open(cuhk / "imgs" / rel)))
        assert np.array_equal(again.mask, synthetic.load_mask(cuhk, meta["images"][rel]))
    sharp = json.loads(json.dumps(meta))
    for cam in sharp["cameras"]:
        cam.update(blur=0.0, lowres=1.0)
    for rel, other in zip(rels, rels[1:] + rels[:1]):
        base = synthetic.rerender(sharp, rel)
        scene = meta["images"][rel]["scene"]
        cam = next(c["id"] for c in sharp["cameras"] if c["scene"] != scene)
        swapped = synthetic.rerender(sharp, rel, scene_camera=cam, scene_seed=1)
        assert np.array_equal(swapped.mask, base.mask)
        assert np.array_equal(synthetic.rerender(sharp, rel, scene_camera=cam, scene_seed=1).image, swapped.image)
        same = (swapped.image == base.image).all(-1)
        person = (base.mask > 0) & (base.mask != PART_LABELS["occluder"])
        assert same[_eroded(person)].mean() > 0.99, rel  # edge pixels mix the person with the scene
        assert same[base.mask == 0].mean() < 0.1, rel
        recast = synthetic.rerender(sharp, rel, person_from=other)
        other_mask, occ = synthetic.rerender(sharp, other).mask, PART_LABELS["occluder"]
        free = (recast.mask != occ) & (other_mask != occ)
        assert np.array_equal(recast.mask[free], other_mask[free]), rel  # the other image's person
        scene_px = _eroded((base.mask == 0) & (recast.mask == 0))
        assert (recast.image == base.image).all(-1)[scene_px].mean() > 0.99, rel
        assert (recast.image == base.image).all(-1)[_eroded(person & (recast.mask == 0))].mean() < 0.5, rel
    with pytest.raises(ValueError, match="scene_camera"):
        synthetic.rerender(meta, rels[0], scene_camera=len(meta["cameras"]))
    with pytest.raises(ValueError, match="not an image"):
        synthetic.rerender(meta, "test/nope.png")
