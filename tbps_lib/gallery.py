"""A search gallery from any folder of images: scan, safe decoding, a per-model embedding cache, a skip report.

:func:`index_folder` turns a folder (searched recursively for ``.jpg .jpeg .png .webp .bmp``) into a
:class:`FolderGallery`: the usable images, their embeddings by a model, and the files that were skipped
with the reason. :class:`tbps_lib.search.CaptionSearch` searches it like a dataset split
(``CaptionSearch.from_run(run, gallery=DIR)``, ``CaptionSearch.from_file(path, gallery=DIR)``).

Files nobody checked:

* Nothing in the folder is written, renamed or deleted; files are only opened for reading.
* Bad files never stop the indexing; each is skipped and listed (:attr:`FolderGallery.skipped`): an empty
  file, a truncated or undecodable file, a file that is not an image, an image above ``MAX_IMAGE_PIXELS``
  (decompression-bomb guard, checked from the header before any pixel is decoded), one below
  ``MIN_IMAGE_SIDE`` pixels on a side, an unreadable file, a broken symbolic link. Symbolic links to files
  are followed (read only); symbolic links to folders are not (no loops) and are listed.
* Camera photos are turned upright by their EXIF orientation tag. Modes are converted where sensible: 16-bit and 32-bit grayscale scaled to 8 bits, CMYK, palette, grayscale
  and two-level to RGB, transparency (RGBA, LA, palette with a transparent colour) composited over white.

Transforms (``fit``): ``"stretch"`` (default) is the training transform (``data.loaders.image_tensor``:
bicubic resize to the run's ``image.img_size`` whatever the aspect ratio), right for person crops of any
aspect ratio, which is what the models were trained on. ``"pad"`` first pads the image to the input's
aspect ratio with the ImageNet mean colour (zero after normalisation), keeping proportions. Images that are
not person crops (a street scene, a group photo) are taken whole: the model sees the entire picture shrunk
to e.g. 384x128 and ranks it by how much of it looks like the description; crop the persons first (a
detector is not part of the workbook) for useful results.

Cache: ``<cache_dir>/<folder key>/`` holds ``embeddings.safetensors`` (one row per usable file) and
``index.json`` (the folder, the model key, the transform, each file's size and modification time, the
skipped files). A new index reuses the rows of unchanged files (same path, size and ``st_mtime_ns``),
encodes new and changed files, and drops removed ones. Nothing is unpickled: safetensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tbps_lib.data.loaders import IMAGENET_MEAN, image_tensor, normalize_image
from tbps_lib.engine.evaluate import Encoded, _check_feats, autocast_context
from tbps_lib.utils import atomic_write, atomic_write_json
from tbps_lib.utils import progress as progress_bar

#: File name endings (lower case) that are gallery images; other files are counted as ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Decompression-bomb limit: images with more pixels are skipped before decoding (a person crop is far
#: smaller; Pillow's own limit, ``Image.MAX_IMAGE_PIXELS``, is about 89 million and only warns below 2x).
MAX_IMAGE_PIXELS = 40_000_000
#: Images with a side shorter than this are skipped (nothing to recognise in them).
MIN_IMAGE_SIDE = 8
#: How an image is brought to the model's input size (see the module docstring).
FITS = ("stretch", "pad")
CACHE_VERSION = 1
INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.safetensors"


class BadImageError(ValueError):
    """A gallery file that cannot be used; the message is the reason shown in the skip report."""


class GalleryError(ValueError):
    """A gallery folder that cannot be searched (not a folder, or nothing usable in it)."""


class EmptyGalleryError(GalleryError):
    """The folder has no usable image (the message says what was found and skipped)."""


@dataclass(frozen=True)
class FolderFile:
    """A candidate image: its path relative to the folder (POSIX), size in bytes and ``st_mtime_ns``."""

    path: str
    size: int
    mtime_ns: int

    @property
    def signature(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of the gallery and why."""

    path: str
    reason: str


@dataclass
class FolderScan:
    """What :func:`scan_folder` found: candidate images, files already known to be unusable, and the number
    of files with other extensions (ignored, not listed)."""

    folder: Path
    files: list[FolderFile]
    skipped: list[SkippedFile]
    ignored: int


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(folder: str | os.PathLike) -> FolderScan:
    """List the images under ``folder`` (recursively, sorted by relative path) without opening them.

    Broken symbolic links, empty files, files that cannot be examined, anything that is not a regular file,
    sub-folders that cannot be listed, and symbolic links to folders (not followed) go to ``skipped``.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"gallery folder {root} does not exist")
    if not root.is_dir():
        raise GalleryError(f"gallery {root} is not a folder (give a folder of images)")
    root = root.resolve()
    files: list[FolderFile] = []
    skipped: list[SkippedFile] = []
    ignored = 0
    def unreadable(error: OSError) -> None:  # a sub-folder that cannot be listed is reported, not dropped
        where = Path(error.filename or root)
        rel = where.relative_to(root).as_posix() if where != root else "."
        skipped.append(SkippedFile(rel, f"folder cannot be read: {error.strerror or error}"))

    for here, dirs, names in os.walk(root, onerror=unreadable, followlinks=False):
        dirs.sort()
        base = Path(here)
        for d in dirs:
            if (base / d).is_symlink():
                skipped.append(SkippedFile((base / d).relative_to(root).as_posix(),
                                           "symbolic link to a folder (not followed)"))
        for name in sorted(names):
            path = base / name
            rel = path.relative_to(root).as_posix()
            if not _is_image_name(name):
                ignored += 1
                continue
            try:
                info = path.stat()  # follows a symbolic link
            except FileNotFoundError:
                skipped.append(SkippedFile(rel, "broken symbolic link" if path.is_symlink() else "vanished"))
                continue
            except OSError as e:
                skipped.append(SkippedFile(rel, f"cannot be examined: {e.strerror or e}"))
                continue
            if not stat.S_ISREG(info.st_mode):
                skipped.append(SkippedFile(rel, "not a regular file"))
            elif info.st_size == 0:
                skipped.append(SkippedFile(rel, "empty file (0 bytes)"))
            else:
                files.append(FolderFile(rel, int(info.st_size), int(info.st_mtime_ns)))
    files.sort(key=lambda f: f.path)
    skipped.sort(key=lambda s: s.path)
    return FolderScan(root, files, skipped, ignored)


# ----------------------------------------------------------------------------------------------------
# Decoding


def _open_file(path: Path) -> BinaryIO:
    """Open ``path`` for reading (binary); the one place gallery files are opened."""
    return open(path, "rb")


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB version of ``img``: 16/32-bit grayscale scaled to 8 bits, transparency over white, CMYK,
    palette, grayscale and two-level images converted."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        array = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0  # 16-bit range to 8-bit
        return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (camera photos are often stored sideways); unchanged
    when there is no tag or the EXIF data cannot be read."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # a damaged EXIF block is no reason to drop the picture
        return img


def fit_image(img: Image.Image, size: tuple[int, int], fit: str = "stretch") -> Tensor:
    """uint8 [3, H, W] of an RGB image at ``size`` = (height, width): ``"stretch"`` is the training
    transform; ``"pad"`` pads to the input's aspect ratio with the ImageNet mean colour first."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if fit == "pad":
        h, w = size
        width, height = img.size
        if width * h != height * w:  # pad the short direction so that width / height = w / h
            new_w, new_h = max(width, -(-height * w // h)), max(height, -(-width * h // w))
            canvas = Image.new("RGB", (new_w, new_h), tuple(round(255 * m) for m in IMAGENET_MEAN))
            canvas.paste(img, ((new_w - width) // 2, (new_h - height) // 2))
            img = canvas
    return image_tensor(img, size)


def decode_image(path: str | os.PathLike, size: tuple[int, int], fit: str = "stretch") -> Tensor:
    """Read one gallery file as uint8 [3, H, W] at ``size``; raise :class:`BadImageError` with the reason
    when it cannot be used (the size limits are checked from the header, before decoding the pixels)."""
    try:
        with _open_file(Path(path)) as handle, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise BadImageError(f"too large: {width}x{height} pixels (limit {MAX_IMAGE_PIXELS:,}, "
                                        f"decompression-bomb guard)")
                if min(width, height) < MIN_IMAGE_SIDE:
                    raise BadImageError(f"too small: {width}x{height} pixels (at least {MIN_IMAGE_SIDE} a side)")
                img.load()
                return fit_image(to_rgb(upright(img)), size, fit)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"too large (decompression-bomb guard): {str(e).split(', could')[0]}") from None
    except UnidentifiedImageError:
        raise BadImageError("not an image (or a format Pillow cannot read)") from None
    except PermissionError:
        raise BadImageError("cannot be read: permission denied") from None
    except Exception as e:  # truncated data, corrupt headers, odd modes: whatever Pillow raises
        raise BadImageError(f"cannot be decoded: {type(e).__name__}: {e}") from None


class _FolderImages(Dataset):
    """The files to encode; an item is the normalised image or the reason it was skipped."""

    def __init__(self, root: Path, files: Sequence[FolderFile], size: tuple[int, int], fit: str) -> None:
        self.root, self.files, self.size, self.fit = root, list(files), (int(size[0]), int(size[1])), fit

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = normalize_image(decode_image(self.root / self.files[index].path, self.size, self.fit))
            return {"index": index, "image": image, "error": None}
        except BadImageError as e:
            return {"index": index, "image": None, "error": str(e)}


def _collate_folder(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if it["image"] is not None]
    return {"images": torch.stack([it["image"] for it in good]) if good else None,
            "index": [it["index"] for it in good],
            "errors": [(it["index"], it["error"]) for it in items if it["image"] is None]}


@torch.no_grad()
def encode_files(model: torch.nn.Module, root: Path, files: Sequence[FolderFile], size: tuple[int, int],
                 fit: str = "stretch", batch_size: int = 64, num_workers: int = 0,
                 progress: bool = True) -> tuple[dict[str, Tensor], list[int], dict[int, str]]:
    """Encode ``files`` with ``model.encode_images`` (eval mode, no gradients, bf16 autocast on CUDA).

    Returns (features of the usable files, float32 on the CPU; their positions in ``files``; position ->
    reason for each unusable file).
    """
    device = next(model.parameters()).device
    loader = DataLoader(_FolderImages(root, files, size, fit), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate_folder)
    parts: list[dict[str, Tensor]] = []
    kept: list[int] = []
    errors: dict[int, str] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(loader, enabled=progress, desc=f"index {root.name}", unit="batch"):
            errors.update(batch["errors"])
            if batch["images"] is None:
                continue
            with autocast_context(device):
                feats = model.encode_images(batch["images"].to(device))
            parts.append({k: v.float().cpu() for k, v in _check_feats(feats, "encode_images",
                                                                       type(model).__name__).items()})
            kept.extend(batch["index"])
    finally:
        model.train(was_training)
    feats = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return feats, kept, errors


# ----------------------------------------------------------------------------------------------------
# The gallery and its cache


@dataclass
class FolderGallery:
    """A folder indexed by one model: usable ``files`` (gallery order) with their ``image_feats`` rows, the
    ``skipped`` files with reasons, the number of ``ignored`` files (other extensions), and ``stats`` of
    the last indexing (encoded now, reused from the cache, seconds, images per second)."""

    folder: Path
    files: list[FolderFile]
    image_feats: dict[str, Tensor]
    skipped: list[SkippedFile]
    ignored: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def paths(self) -> list[str]:
        """Absolute paths of the usable images, in gallery order."""
        return [str(self.folder / f.path) for f in self.files]

    def to_encoded(self) -> Encoded:
        """The gallery as an :class:`~tbps_lib.engine.evaluate.Encoded` with no queries; person ids are -1
        (unknown), so search results have no ``match``."""
        empty = torch.zeros(0, dtype=torch.long)
        return Encoded(split=f"folder:{self.folder}", image_feats=dict(self.image_feats), text_feats={},
                       query_pids=empty, gallery_pids=torch.full((len(self.files),), -1, dtype=torch.long),
                       image_paths=self.paths, captions=[], query_image_index=empty)

    def skip_report(self) -> pd.DataFrame:
        """One row per skipped file: ``path`` (relative to the folder) and ``reason``."""
        return pd.DataFrame([{"path": s.path, "reason": s.reason} for s in self.skipped], columns=["path", "reason"])

    def summary(self) -> str:
        """``folder: 120 images (3 skipped, 1 other file ignored); 12 encoded, 108 from the cache``."""
        s = self.stats
        extra = [f"{len(self.skipped)} skipped"] if self.skipped else []
        if self.ignored:
            extra.append(f"{self.ignored} other file{'s' if self.ignored != 1 else ''} ignored")
        line = f"{self.folder}: {len(self.files)} images" + (f" ({', '.join(extra)})" if extra else "")
        if s:
            line += f"; {s.get('encoded', 0)} encoded, {s.get('reused', 0)} from the cache"
        return line


def folder_key(folder: Path) -> str:
    """The cache sub-folder of a gallery folder: a hash of its resolved path."""
    return hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:16]


def _read_cache(directory: Path, key: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """The cached index and embeddings when they exist, are readable and were made with ``key``."""
    from safetensors.torch import load_file

    index_path, emb_path = directory / INDEX_FILE, directory / EMBEDDINGS_FILE
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("key") != key:
            return None
        feats = load_file(str(emb_path)) if index["files"] else {}
    except Exception:  # unreadable, damaged or half-written (safetensors has its own errors): rebuilt
        return None
    if any(v.shape[0] != len(index["files"]) for v in feats.values()):
        return None
    return index, feats


def _write_cache(directory: Path, key: dict[str, Any], gallery: FolderGallery,
                 bad: dict[tuple[str, int, int], str]) -> None:
    from safetensors.torch import save_file

    if gallery.image_feats:
        tensors = {k: v.contiguous() for k, v in gallery.image_feats.items()}
        atomic_write(directory / EMBEDDINGS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(directory / INDEX_FILE, {
        "version": CACHE_VERSION, "folder": str(gallery.folder), "key": key,
        "files": [[f.path, f.size, f.mtime_ns] for f in gallery.files],
        "bad": [[p, s, m, reason] for (p, s, m), reason in bad.items()]})


def index_folder(model: torch.nn.Module, folder: str | os.PathLike, img_size: Sequence[int],
                 cache_dir: str | os.PathLike | None = None, model_key: str = "", fit: str = "stretch",
                 batch_size: int = 64, num_workers: int = 0, progress: bool = True) -> FolderGallery:
    """Index ``folder`` with ``model`` at ``img_size`` = (height, width): a :class:`FolderGallery`.

    With ``cache_dir`` the embeddings are kept in ``cache_dir/<folder key>/`` and reused while
    ``model_key`` (which weights), ``img_size``, ``fit`` and the files' sizes and modification times stay
    the same; only new or changed files are decoded and encoded. Files known to be unusable are not tried
    again until they change. Raises :class:`EmptyGalleryError` when no usable image is left.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    from tbps_lib.engine.runs import library_version

    start = time.perf_counter()
    size = (int(img_size[0]), int(img_size[1]))
    scan = scan_folder(folder)
    key = {"model": model_key, "img_size": list(size), "fit": fit, "library_version": library_version(),
           "cache_version": CACHE_VERSION}
    directory = Path(cache_dir).expanduser() / folder_key(scan.folder) if cache_dir is not None else None
    cached = _read_cache(directory, key) if directory is not None else None
    rows: dict[tuple[str, int, int], int] = {}
    bad: dict[tuple[str, int, int], str] = {}
    old_feats: dict[str, Tensor] = {}
    if cached is not None:
        index, old_feats = cached
        rows = {(p, s, m): i for i, (p, s, m) in enumerate(index["files"])}
        bad = {(p, s, m): reason for p, s, m, reason in index.get("bad", [])}
    todo = [f for f in scan.files if f.signature not in rows and f.signature not in bad]
    new_feats, kept, errors = encode_files(model, scan.folder, todo, size, fit, batch_size, num_workers,
                                           progress and bool(todo)) if todo else ({}, [], {})
    new_rows = {todo[i].signature: j for j, i in enumerate(kept)}
    bad = {f.signature: bad[f.signature] for f in scan.files if f.signature in bad}
    bad.update({todo[i].signature: reason for i, reason in errors.items()})
    files, picks = [], []
    for f in scan.files:
        if f.signature in rows:
            files.append(f)
            picks.append(("old", rows[f.signature]))
        elif f.signature in new_rows:
            files.append(f)
            picks.append(("new", new_rows[f.signature]))
    keys = list(new_feats or old_feats)
    feats = {}
    for k in keys:
        sources = {"old": old_feats.get(k), "new": new_feats.get(k)}
        feats[k] = torch.stack([sources[src][i] for src, i in picks]) if picks else torch.zeros(0)
    skipped = sorted(scan.skipped + [SkippedFile(sig[0], reason) for sig, reason in bad.items()],
                     key=lambda s: s.path)
    seconds = time.perf_counter() - start
    gallery = FolderGallery(scan.folder, files, feats, skipped, scan.ignored, {
        "encoded": len(kept), "reused": sum(src == "old" for src, _ in picks), "decode_failed": len(errors),
        "seconds": round(seconds, 3), "images_per_s": round(len(todo) / seconds, 1) if todo else None})
    changed = bool(todo) or cached is None or len(rows) != gallery.stats["reused"]
    if directory is not None and changed:
        _write_cache(directory, key, gallery, bad)
    if not files:
        n = len(scan.files) + len(scan.skipped)
        found = (f"{n} image file{'s' if n != 1 else ''} could not be used" if n else
                 f"no image files ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
        raise EmptyGalleryError(f"gallery folder {scan.folder} has no usable image: {found}"
                                + (f" ({reasons}{' ...' if len(skipped) > 5 else ''})" if reasons else ""))
    return gallery


__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "MIN_IMAGE_SIDE", "FITS", "BadImageError", "GalleryError",
           "EmptyGalleryError", "FolderFile", "SkippedFile", "FolderScan", "scan_folder", "to_rgb", "upright", "fit_image",
           "decode_image", "encode_files", "FolderGallery", "folder_key", "index_folder"]
