"""Folder galleries (tbps_lib/gallery.py), portable runs (tbps_lib/export.py) and their CLI: every bad-file
case is skipped and listed, the folder is never modified, the cache refreshes on change, a folder of a split's
images ranks exactly like the split, and an exported run ranks like the original on a clean registry."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbps_lib import gallery as gallery_mod
from tbps_lib.cli import main
from tbps_lib.data.loaders import load_image
from tbps_lib.engine.runs import train_or_load
from tbps_lib.export import FORMAT, ExportError, export_run, load_exported, read_header, weights_digest
from tbps_lib.gallery import (EmptyGalleryError, GalleryError, decode_image, fit_image, index_folder, scan_folder,
                              to_rgb)
from tbps_lib.search import CaptionSearch, SearchInputError
from test_trainer import _toy_registered, toy_config, write_toy_dataset  # noqa: F401

SIZE = (16, 8)  # the toy's img_size


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("gallery") / "data")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    return train_or_load(toy_config(data), runs_dir=tmp_path_factory.mktemp("gallery_runs"), progress=False,
                         device="cpu")


def _person(path: Path, size=(32, 16), mode="RGB", fmt=None) -> Path:
    """A small two-colour 'person' image saved as ``path`` in ``mode``."""
    arr = np.zeros((size[0], size[1], 3), dtype=np.uint8)
    arr[: size[0] // 2] = (200, 30, 30)
    arr[size[0] // 2:] = (20, 20, 180)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and has no pixel data (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: kind, size, mtime and content hash (links by their target)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            st = path.stat()
            out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[rel] = ("dir",)
    return out


# ----------------------------------------------------------------------------------------------------
# Decoding: each bad-file case, and the modes that are converted


def test_good_images_of_every_extension_decode(tmp_path):
    for ext in ("jpg", "jpeg", "png", "webp", "bmp"):
        image = decode_image(_person(tmp_path / f"p.{ext}"), SIZE)
        assert image.shape == (3, 16, 8) and image.dtype == torch.uint8
        assert image[0, 2, 4] > 150 and image[2, 13, 4] > 120  # red top, blue bottom survive


def test_stretch_is_the_training_transform(tmp_path):
    path = _person(tmp_path / "p.png", size=(40, 13))
    assert torch.equal(decode_image(path, SIZE), load_image(path, SIZE))


def test_pad_keeps_the_aspect_ratio_with_the_mean_colour(tmp_path):
    wide = Image.new("RGB", (32, 16), (255, 0, 0))  # 2:1 wide into a 1:2 tall input
    padded = fit_image(wide, SIZE, "pad")
    assert padded.shape == (3, 16, 8)
    assert tuple(padded[:, 0, 4].tolist()) == (124, 116, 104)  # top rows: ImageNet mean padding
    assert padded[0, 8, 4] == 255 and padded[1, 8, 4] == 0  # middle: the image
    with pytest.raises(ValueError, match="fit must be one of"):
        fit_image(wide, SIZE, "crop")


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "1", "LA", "RGBA"])
def test_modes_are_converted(tmp_path, mode):
    fmt, ext = ("JPEG", "jpg") if mode == "CMYK" else ("PNG", "png")
    image = decode_image(_person(tmp_path / f"m.{ext}", mode=mode, fmt=fmt), SIZE)
    assert image.shape == (3, 16, 8)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((32, 16), 32768, dtype=np.uint16)
    arr[16:] = 65535
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    image = decode_image(path, SIZE)
    assert image[:, 2, 4].tolist() == [128] * 3 and image[:, 13, 4].tolist() == [255] * 3


def test_camera_photos_are_turned_upright_by_their_exif_tag(tmp_path):
    sideways = Image.new("RGB", (32, 16), (0, 0, 200))
    sideways.paste((200, 0, 0), (0, 0, 16, 16))  # red on the left: upright, red is the top half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    sideways.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = decode_image(tmp_path / "phone.jpg", SIZE)
    assert image[0, 2, 4] > 150 and image[2, 2, 4] < 80  # top: red
    assert image[2, 13, 4] > 150 and image[0, 13, 4] < 80  # bottom: blue


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    assert to_rgb(half).getpixel((0, 0)) == (0, 0, 0)


BAD_CASES = {
    "empty.jpg": "empty file",
    "truncated.png": "cannot be decoded",
    "text.jpg": "not an image",
    "bomb.png": "too large",
    "tiny.png": "too small",
    "locked.png": "permission denied",
    "dangling.jpg": "broken symbolic link",
}


def _bad_folder(root: Path) -> Path:
    """A folder with one good image per subfolder level and every bad-file case."""
    _person(root / "good1.png")
    _person(root / "sub" / "deeper" / "good2.jpg")
    (root / "empty.jpg").write_bytes(b"")
    whole = _person(root / "full.png", size=(64, 32)).read_bytes()
    (root / "full.png").unlink()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "text.jpg").write_text("this is not a picture", encoding="utf-8")
    (root / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    _person(root / "tiny.png", size=(4, 4))
    _person(root / "locked.png")
    os.symlink(root / "does-not-exist.jpg", root / "dangling.jpg")
    (root / "notes.txt").write_text("ignored", encoding="utf-8")
    return root


def _lock(monkeypatch, name: str) -> None:
    """``name`` cannot be opened (chmod 000 does not stop root, so the opener is patched as well)."""
    real = gallery_mod._open_file

    def opener(path: Path):
        if path.name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(gallery_mod, "_open_file", opener)


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_each_bad_file_is_skipped_with_its_reason(trained, tmp_path, monkeypatch, name):
    folder = _bad_folder(tmp_path / "photos")
    _lock(monkeypatch, "locked.png")
    found = index_folder(trained.model, folder, SIZE, progress=False)
    reasons = {s.path: s.reason for s in found.skipped}
    assert BAD_CASES[name] in reasons[name], reasons[name]
    assert [f.path for f in found.files] == ["good1.png", "sub/deeper/good2.jpg"]
    assert found.ignored == 1 and found.image_feats["global"].shape[0] == 2


def test_an_enormous_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = _person(tmp_path / "big.png", size=(200, 100))
    monkeypatch.setattr(gallery_mod, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a too-large image"))
    with pytest.raises(gallery_mod.BadImageError, match=r"too large: 100x200 pixels \(limit 10,000"):
        decode_image(path, SIZE)


def test_symlinks_to_files_are_followed_and_to_folders_listed(trained, tmp_path):
    outside = _person(tmp_path / "elsewhere" / "p.png")
    folder = tmp_path / "photos"
    _person(folder / "a.png")
    os.symlink(outside, folder / "link.png")
    os.symlink(tmp_path / "elsewhere", folder / "linked_dir")
    found = index_folder(trained.model, folder, SIZE, progress=False)
    assert [f.path for f in found.files] == ["a.png", "link.png"]
    assert [(s.path, s.reason) for s in found.skipped] == [("linked_dir", "symbolic link to a folder (not followed)")]


def test_an_unlistable_subfolder_is_reported(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    _person(folder / "a.png")
    (folder / "private").mkdir()
    real = os.scandir

    def scandir(path):
        if Path(path).name == "private":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_folder(folder)
    assert [f.path for f in scan.files] == ["a.png"]
    assert [(s.path, s.reason) for s in scan.skipped] == [("private", "folder cannot be read: Permission denied")]


def test_the_folder_is_never_modified(trained, tmp_path, monkeypatch):
    folder = _bad_folder(tmp_path / "photos")
    _lock(monkeypatch, "locked.png")
    before = _snapshot(folder)
    search = CaptionSearch.from_run(trained, gallery=folder)
    search.search("a person in a red shirt", k=2)
    assert _snapshot(folder) == before
    assert not (trained.dir / "galleries").is_relative_to(folder)


def test_empty_and_unusable_folders_are_clear_messages(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyGalleryError, match=r"has no usable image: no image files \(.jpg"):
        index_folder(trained.model, tmp_path / "empty", SIZE, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("nope", encoding="utf-8")
    (tmp_path / "bad" / "y.png").write_bytes(b"")
    with pytest.raises(EmptyGalleryError, match=r"2 image files could not be used \(x.jpg: not an image"):
        index_folder(trained.model, tmp_path / "bad", SIZE, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(GalleryError, match="is not a folder"):
        scan_folder(tmp_path / "bad" / "x.jpg")


# ----------------------------------------------------------------------------------------------------
# The cache


def test_cache_refreshes_on_added_changed_and_removed_files(trained, tmp_path):
    folder, cache = tmp_path / "photos", tmp_path / "cache"
    for i in range(4):
        _person(folder / f"p{i}.png")
    index = lambda: index_folder(trained.model, folder, SIZE, cache, "key-1", progress=False)  # noqa: E731
    first = index()
    assert first.stats["encoded"] == 4 and first.stats["reused"] == 0
    again = index()
    assert again.stats["encoded"] == 0 and again.stats["reused"] == 4
    assert torch.equal(again.image_feats["global"], first.image_feats["global"])
    # added
    Image.new("RGB", (16, 32), (0, 200, 0)).save(folder / "p9.png")
    added = index()
    assert (added.stats["encoded"], added.stats["reused"], len(added)) == (1, 4, 5)
    # changed (new content, size and mtime)
    Image.new("RGB", (16, 30), (250, 250, 0)).save(folder / "p1.png")
    changed = index()
    assert (changed.stats["encoded"], changed.stats["reused"]) == (1, 4)
    fresh = index_folder(trained.model, folder, SIZE, None, progress=False)
    assert torch.allclose(changed.image_feats["global"], fresh.image_feats["global"], atol=1e-6)
    assert not torch.allclose(changed.image_feats["global"][1], added.image_feats["global"][1])
    # removed
    (folder / "p0.png").unlink()
    removed = index()
    assert (removed.stats["encoded"], len(removed)) == (0, 4) and [f.path for f in removed.files][0] == "p1.png"
    assert torch.equal(removed.image_feats["global"], changed.image_feats["global"][1:])
    # another model key (other weights) or transform: recomputed
    assert index_folder(trained.model, folder, SIZE, cache, "key-2", progress=False).stats["encoded"] == 4
    assert index_folder(trained.model, folder, SIZE, cache, "key-2", fit="pad", progress=False).stats["encoded"] == 4
    # only JSON and safetensors on disk: nothing to unpickle
    assert {p.suffix for p in cache.rglob("*") if p.is_file()} == {".json", ".safetensors"}


def test_a_bad_file_is_not_retried_until_it_changes(trained, tmp_path):
    folder, cache = tmp_path / "photos", tmp_path / "cache"
    _person(folder / "good.png")
    (folder / "bad.jpg").write_text("nope", encoding="utf-8")
    first = index_folder(trained.model, folder, SIZE, cache, "k", progress=False)
    assert first.stats["decode_failed"] == 1 and [s.path for s in first.skipped] == ["bad.jpg"]
    again = index_folder(trained.model, folder, SIZE, cache, "k", progress=False)
    assert again.stats["encoded"] == 0 and [s.path for s in again.skipped] == ["bad.jpg"]
    _person(folder / "bad.jpg", fmt="JPEG")  # fixed by the user
    fixed = index_folder(trained.model, folder, SIZE, cache, "k", progress=False)
    assert fixed.stats["encoded"] == 1 and not fixed.skipped and len(fixed) == 2


def test_a_damaged_cache_is_rebuilt(trained, tmp_path):
    folder, cache = tmp_path / "photos", tmp_path / "cache"
    _person(folder / "a.png")
    index_folder(trained.model, folder, SIZE, cache, "k", progress=False)
    for f in cache.rglob("embeddings.safetensors"):
        f.write_bytes(b"garbage")
    assert index_folder(trained.model, folder, SIZE, cache, "k", progress=False).stats["encoded"] == 1


# ----------------------------------------------------------------------------------------------------
# Searching a folder


def _split_as_folder(trained, dest: Path) -> Path:
    """The run's test images copied into a plain folder (no annotations)."""
    dest.mkdir(parents=True)
    for path in trained.embeddings("test").image_paths:
        shutil.copy2(path, dest / Path(path).name)
    return dest


def test_a_folder_of_the_split_ranks_like_the_split(trained, tmp_path):
    split = CaptionSearch.from_run(trained, "test")
    folder = CaptionSearch.from_run(trained, gallery=_split_as_folder(trained, tmp_path / "copy"))
    assert folder.gallery_size == split.gallery_size == 12 and folder.folder_gallery is not None
    assert folder.name == f"{trained.name}/copy"
    for caption in split.encoded.captions[::5]:
        a, b = split.search(caption, k=12), folder.search(caption, k=12)
        assert [Path(p).name for p in a["image"]] == [Path(p).name for p in b["image"]]
        np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-6)
        assert b["match"].tolist() == [None] * 12 and (b["pid"] == -1).all()
    with pytest.raises(SearchInputError, match="no captions to draw from"):
        folder.random_query(np.random.default_rng(0))
    assert len(folder.search("a red shirt", k=3, rerank="visual_neighbors")) == 3


# ----------------------------------------------------------------------------------------------------
# Export


def test_export_then_load_on_a_clean_registry_ranks_the_same(trained, tmp_path, monkeypatch):
    folder = _split_as_folder(trained, tmp_path / "copy")
    original = CaptionSearch.from_run(trained, gallery=folder)
    path = export_run(trained, tmp_path / "model.tbps")
    header = read_header(path)
    assert header["format"] == FORMAT and header["method"] == trained.config.method
    assert json.loads(header["metrics"])["test"] == trained.metrics["test"]
    monkeypatch.setenv("TBPS_RUNS", str(tmp_path / "no-registry"))
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache-home"))
    loaded = load_exported(path, device="cpu")
    assert loaded.model is not trained.model and loaded.weights_sha256 == weights_digest(trained.model)
    for k, v in trained.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    portable = CaptionSearch.from_file(path, folder, device="cpu")
    assert portable.name == f"{trained.name}/copy"
    assert list((tmp_path / "cache-home" / "galleries").iterdir())  # the folder cache left the folder alone
    for caption in ("a person in a red shirt and blue trousers", "someone wearing green pants with a yellow top"):
        a, b = original.search(caption, k=12), portable.search(caption, k=12)
        assert a["image"].tolist() == b["image"].tolist()
        np.testing.assert_allclose(a["score"], b["score"], rtol=1e-6)
    assert not (tmp_path / "no-registry").exists()


def test_weights_digest_covers_scalars_and_every_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # a 0-dim long buffer
    model.register_buffer("bf16", torch.ones(2, dtype=torch.bfloat16))
    first = weights_digest(model)
    model[1].num_batches_tracked += 1
    assert weights_digest(model) != first and len(first) == 64


def _rewrite(path: Path, out: Path, **changes) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = {**f.metadata(), **changes}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_loading_refuses_unknown_methods_versions_and_other_files(trained, tmp_path):
    path = export_run(trained, tmp_path / "model.tbps")
    with pytest.raises(ExportError, match="method 'nonexistent'.*registered methods"):
        load_exported(_rewrite(path, tmp_path / "m.tbps", method="nonexistent"))
    with pytest.raises(ExportError, match="written by tbps_lib 9.3.0.*major.minor"):
        load_exported(_rewrite(path, tmp_path / "v.tbps", library_version="9.3.0"))
    with pytest.raises(ExportError, match="export format version 7"):
        load_exported(_rewrite(path, tmp_path / "f.tbps", format_version="7"))
    with pytest.raises(ExportError, match="format None"):
        load_exported(_plain_safetensors(tmp_path / "plain.safetensors"))
    pickled = tmp_path / "model.pt"
    torch.save({"model": trained.model.state_dict()}, pickled)  # a pickle is never opened as a model
    with pytest.raises(ExportError, match="not a safetensors file"):
        load_exported(pickled)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_exported(tmp_path / "missing.tbps")


def _plain_safetensors(out: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(out))
    return out


# ----------------------------------------------------------------------------------------------------
# CLI


def test_cli_search_a_folder_prints_the_skip_summary(trained, tmp_path, capsys):
    folder = _split_as_folder(trained, tmp_path / "photos")
    (folder / "broken.jpg").write_text("nope", encoding="utf-8")
    (folder / "zero.png").write_bytes(b"")
    assert main(["search", str(trained.dir), "a person in a red shirt", "--gallery", str(folder), "--k", "3",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "12 images (2 skipped)" in captured.err and "skipped broken.jpg: not an image" in captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith(f"{trained.name}/photos: 3 results in") and len(lines) == 5
    assert lines[1].split() == ["rank", "image", "score"]  # no person ids in a folder


def test_cli_export_and_search_the_file_as_json(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache-home"))
    folder = _split_as_folder(trained, tmp_path / "photos")
    (folder / "zero.png").write_bytes(b"")
    out = tmp_path / "exported" / "model.tbps"
    assert main(["export", str(trained.dir), "--out", str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out and out.is_file()
    assert main(["search", str(out), "a person in a red shirt", "--gallery", str(folder), "--k", "2", "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in result["results"]] == [1, 2]
    assert result["skipped"] == [{"path": "zero.png", "reason": "empty file (0 bytes)"}]


@pytest.mark.parametrize("make, message", [
    (lambda run, tmp: [str(export_run(run, tmp / "m.tbps"))], "give the folder to search with --gallery"),
    (lambda run, tmp: [str(run.dir), "--gallery", str(Path(tmp / "empty").mkdir() or tmp / "empty")],
     "has no usable image"),
    (lambda run, tmp: [str(run.dir), "--gallery", str(tmp / "missing")], "does not exist"),
    (lambda run, tmp: [str((tmp / "junk.tbps").write_bytes(b"junk") and tmp / "junk.tbps"), "--gallery", str(tmp)],
     "not an exported tbps_lib run"),
])
def test_cli_folder_errors_are_one_line(trained, tmp_path, capsys, make, message):
    args = make(trained, tmp_path)
    assert main(["search", args[0], "a red shirt", *args[1:], "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tbps: error: ") and message in err and "\n" not in err
