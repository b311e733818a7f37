"""The built-in synthetic pedestrian benchmark: presets, generation, the cache and the sidecar.

The real datasets are licensed by request, so the workbook ships a generator whose output has their
on-disk layout (CUHK-PEDES: ``reid_raw.json`` + ``imgs/``) and their shape (images per identity,
captions per image, caption length, splits), plus a sidecar ``synthetic_meta.json`` with each image's
attributes, visible slots, view, camera, part boxes and the path of its part-label mask (under
``masks/``). The pieces live in sibling modules: identities in ``synthetic_attributes``, cameras and
surroundings in ``synthetic_scene``, drawing in ``synthetic_render``, captions in ``synthetic_captions``.

Determinism: every image draws from its own random stream seeded by (seed, preset, person id, image
index), so the output is byte-identical for the same arguments whatever the number of worker processes.
The same streams let :func:`rerender` draw a stored image again, pixel for pixel, or with its
surroundings or its person swapped (the scene-swap measurement of notebook 07).
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import numbers
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from tbps_lib.data import synthetic_captions as captions
from tbps_lib.data.formats import SIDECAR, SIDECAR_VERSION, read_meta, read_sidecar
from tbps_lib.data.synthetic_attributes import SLOTS, sample_identities, signature
from tbps_lib.data.synthetic_render import MASK_PALETTE, PART_LABELS, Rendered, render_image, render_swapped
from tbps_lib.data.synthetic_scene import CameraSetup, make_cameras, stable_seed
from tbps_lib.utils import cache_home
from tbps_lib.utils import progress as progress_bar

GENERATOR_VERSION = 1  # bump when output changes, so cached sets are regenerated
MIN_SLOTS = 3  # a caption mentions at least this many visible slots


@dataclass(frozen=True)
class Preset:
    """The shape of one synthetic dataset, mirroring a real one (``mirrors``, ``real`` says how).

    ``held_out`` lists (split, share of identities, cap) for the non-training splits, so the default
    ~1,000 identities get 10 % val/test and a paper-sized run (``ids`` = the real count) gets the real
    split sizes; ``images_per_id`` is a distribution {count: probability}; ``distinct_cameras`` makes every
    image of a person come from a different camera; ``styles`` is the annotator mix; ``words`` the range
    the mean caption length (in words) must fall in, which the tests check; ``min_words`` the shortest
    caption allowed (RSTPReid's annotators wrote at least 23 words); ``lexicon`` the words this
    dataset's annotators prefer (usual word -> preferred synonym), a vocabulary shift between presets.
    ``avoid`` (the pretraining corpus only) names benchmark sets (preset, seed, ids) whose identities this
    set must not contain: their attribute signatures are taken before any identity is drawn.
    """

    name: str
    mirrors: str
    real: str
    default_ids: int
    held_out: tuple[tuple[str, float, int], ...]
    images_per_id: tuple[tuple[int, float], ...]
    distinct_cameras: bool
    captions_per_image: int
    styles: tuple[tuple[str, float], ...]
    cameras: CameraSetup
    words: tuple[float, float]
    difficulty: float = 0.5
    splits: tuple[str, ...] = field(default=("train", "val", "test"))
    min_words: int = 0
    lexicon: tuple[tuple[str, str], ...] = ()
    avoid: tuple[tuple[str, int, int], ...] = ()  # benchmarks (preset, seed, ids) whose identities are not drawn

    def mean_images_per_id(self) -> float:
        return float(sum(n * p for n, p in self.images_per_id))


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="cuhk-like", mirrors="CUHK-PEDES",
        real="40,206 images, 13,003 ids (3.1 images/id), 2 captions/image, 23.5 words, train/val/test "
             "11,003/1,000/1,000 ids; images pooled from several re-id sets (mixed, often low-quality cameras)",
        default_ids=1000, held_out=(("val", 0.1, 1000), ("test", 0.1, 1000)),
        images_per_id=((2, 0.25), (3, 0.45), (4, 0.22), (5, 0.08)), distinct_cameras=True,
        captions_per_image=2,
        styles=(("plain", 0.35), ("terse", 0.2), ("casual", 0.2), ("narrative", 0.25)),
        cameras=CameraSetup(n_cameras=12, indoor_share=0.3, gain=(0.75, 1.15), cast=0.06, blur=(0.2, 1.0),
                            noise=(2.0, 6.0), lowres=0.45, crowd=0.7, occlusion=0.12, truncation=0.05,
                            scale=(0.8, 0.95), tone=(1.06, 1.0, 0.9), gamma=0.95, contrast=0.85),
        words=(20.0, 27.0), lexicon=(("grey", "gray"), ("handbag", "purse"), ("phone", "cell phone"))),
    Preset(
        name="icfg-like", mirrors="ICFG-PEDES",
        real="54,522 images, 4,102 ids (13.3 images/id), 1 caption/image, 37.2 words, train/test 3,102/1,000 "
             "ids, no val; MSMT17 cameras (15, strong lighting changes). Here about 5 images/id to stay "
             "CPU-sized",
        default_ids=1000, held_out=(("test", 0.25, 1000),),
        images_per_id=((3, 0.2), (4, 0.25), (5, 0.25), (6, 0.15), (8, 0.1), (10, 0.05)),
        distinct_cameras=False, captions_per_image=1,
        styles=(("inventory", 0.55), ("thorough", 0.45)),
        cameras=CameraSetup(n_cameras=15, indoor_share=0.2, gain=(0.55, 1.3), cast=0.12, blur=(0.0, 0.6),
                            noise=(3.0, 9.0), lowres=0.15, crowd=1.2, occlusion=0.2, truncation=0.06,
                            scale=(0.78, 0.95), tone=(0.94, 1.0, 1.08), gamma=1.1, contrast=1.1),
        words=(32.0, 42.0), splits=("train", "test"),
        lexicon=(("pants", "trousers"), ("sneakers", "sport shoes"), ("phone", "mobile phone"),
                 ("sweater", "pullover"), ("jeans", "denim pants"), ("glasses", "spectacles"),
                 ("leather shoes", "formal shoes"))),
    Preset(
        name="rstp-like", mirrors="RSTPReid",
        real="20,505 images, 4,101 ids, 5 images/id from 5 of 15 cameras, 2 captions/image, >= 23 words, "
             "train/val/test 3,701/200/200 ids",
        default_ids=1000, held_out=(("val", 0.1, 200), ("test", 0.1, 200)),
        images_per_id=((5, 1.0),), distinct_cameras=True, captions_per_image=2,
        styles=(("observer", 0.4), ("storyteller", 0.3), ("reporter", 0.3)),
        cameras=CameraSetup(n_cameras=15, indoor_share=0.25, gain=(0.6, 1.25), cast=0.1, blur=(0.0, 0.8),
                            noise=(2.0, 8.0), lowres=0.25, crowd=1.0, occlusion=0.18, truncation=0.05,
                            scale=(0.8, 0.96), tone=(1.0, 0.97, 1.03), gamma=1.2, contrast=1.0),
        words=(27.0, 35.0), min_words=23,
        lexicon=(("sneakers", "trainers"), ("phone", "smartphone"), ("shoulder bag", "messenger bag"),
                 ("cap", "baseball cap"), ("hoodie", "hooded sweatshirt"), ("backpack", "rucksack"))),
)}


# The workbook's pretraining corpus ("ImageNet" and "BERT" of the smoke setting, ``tbps_lib.pretrain``): not a
# benchmark (kept out of ``PRESETS``, one training split), with its own preset name (hence its own random
# streams), every annotator style of the three benchmarks, their cameras' variety, no preset lexicon, and
# no identity of the three benchmarks as the smoke runs generate them (seed 0, default ids).
CORPUS_PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="pretrain-corpus", mirrors="(none: pretraining corpus)",
        real="the workbook's own pretraining corpus; shares no identity with the benchmark presets",
        default_ids=3000, held_out=(),
        images_per_id=((2, 0.3), (3, 0.4), (4, 0.3)), distinct_cameras=False, captions_per_image=2,
        styles=tuple((name, 1.0) for p in PRESETS.values() for name, _ in p.styles),
        cameras=CameraSetup(n_cameras=20, indoor_share=0.25, gain=(0.55, 1.3), cast=0.1, blur=(0.0, 1.0),
                            noise=(2.0, 9.0), lowres=0.3, crowd=1.0, occlusion=0.15, truncation=0.05,
                            scale=(0.78, 0.96), tone=(1.0, 1.0, 1.0), gamma=1.05, contrast=1.0),
        words=(15.0, 45.0), splits=("train",),
        avoid=tuple((name, 0, p.default_ids) for name, p in PRESETS.items())),
)}


def get_preset(name: str) -> Preset:
    """The preset (or corpus preset) called ``name``; an unknown name is an error that lists the known ones."""
    known = {**PRESETS, **CORPUS_PRESETS}
    if name not in known:
        raise ValueError(f"unknown synthetic preset {name!r}; known: {sorted(known)}")
    return known[name]


def split_sizes(preset: Preset, n_ids: int) -> dict[str, int]:
    """Identities per split: each held-out split gets min(cap, round(share * n)) (at least 1)."""
    need = len(preset.held_out) + 1
    if n_ids < need:
        raise ValueError(f"preset {preset.name!r} needs at least {need} identities (one per split), got {n_ids}")
    sizes = {s: max(1, min(cap, round(share * n_ids))) for s, share, cap in preset.held_out}
    return {"train": n_ids - sum(sizes.values()), **sizes}


def _check_args(size: Any, difficulty: float, seed: Any) -> tuple[int, int]:
    """Validate the generation arguments; return ``size`` as a pair of ints."""
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, numbers.Integral) for v in size)):
        raise ValueError(f"size must be (height, width) in pixels, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h < 32 or w < 16:
        raise ValueError(f"size must be (height, width) with height >= 32 and width >= 16, got {size}")
    if not 1.0 <= h / w <= 4.0:
        raise ValueError(f"size {h}x{w}: height/width must be between 1 and 4 (a standing person), got {h / w:.2f}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return h, w


# ----------------------------------------------------------------------------------------------------
# Planning: who is in which split, with how many images from which cameras


def plan(preset: Preset, seed: int, n_ids: int, difficulty: float) -> list[dict[str, Any]]:
    """One job per image: person id (1-based), split, image index, camera and the identity.

    The identities of the sets in ``preset.avoid`` are planned first (cheap: no rendering) and their
    signatures taken, so none of them is drawn again here.
    """
    code = stable_seed(preset.name)
    rng = np.random.default_rng([seed, code, 1])
    counts = np.array([n for n, _ in preset.images_per_id])
    probs = np.array([p for _, p in preset.images_per_id], dtype=float)
    taken: set[tuple] = set(avoided_signatures(preset))
    jobs, pid = [], 0
    for split, n in split_sizes(preset, n_ids).items():
        for ident in sample_identities(rng, n, difficulty, taken):
            pid += 1
            k_imgs = int(counts[rng.choice(len(counts), p=probs / probs.sum())])
            n_cam = preset.cameras.n_cameras
            cams = rng.choice(n_cam, size=k_imgs, replace=not (preset.distinct_cameras and k_imgs <= n_cam))
            for k, cam in enumerate(cams):
                jobs.append({"pid": pid, "split": split, "k": k, "camera": int(cam), "ident": ident})
    return jobs


def avoided_signatures(preset: Preset) -> set[tuple]:
    """Attribute signatures of every identity of the benchmark sets named in ``preset.avoid``."""
    out: set[tuple] = set()
    for name, seed, ids in preset.avoid:
        other = get_preset(name)
        out.update(signature(j["ident"]) for j in plan(other, seed, ids, other.difficulty))
    return out


def file_name(job: dict[str, Any]) -> str:
    """``<split>/<pid>_c<camera>_<k>.png``: the image's path under ``imgs/`` (and its mask's under ``masks/``)."""
    return f"{job['split']}/{job['pid']:05d}_c{job['camera']:02d}_{job['k']}.png"


# ----------------------------------------------------------------------------------------------------
# Rendering one image with its captions (runs in worker processes)


def _png(arr: np.ndarray, palette: list[tuple[int, int, int]] | None = None) -> bytes:
    img = Image.fromarray(arr)
    if palette is not None:
        img.putpalette([c for rgb in palette for c in rgb])
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _image_stream(job: dict[str, Any], ctx: dict[str, Any]) -> tuple[np.random.Generator, Any]:
    """The image's random stream, set back to the start of its accepted draw, and that draw (the view and
    occlusion are re-drawn until at least ``MIN_SLOTS`` slots are visible)."""
    preset = get_preset(ctx["preset"])
    ident, cam = job["ident"], ctx["cameras"][job["camera"]]
    rng = np.random.default_rng([ctx["seed"], stable_seed(preset.name), job["pid"], job["k"]])
    for _ in range(50):
        start = rng.bit_generator.state
        r = render_image(ident, cam, ctx["size"], rng)
        if sum(s in SLOTS for s in r.visible) >= MIN_SLOTS:
            rng.bit_generator.state = start
            return rng, r
    raise RuntimeError(f"person {job['pid']} image {job['k']}: fewer than {MIN_SLOTS} visible slots in 50 draws")


def make_image(job: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Render one job: image and mask PNG bytes, captions, and the sidecar entry (without mask path)."""
    preset = get_preset(ctx["preset"])
    ident, cam = job["ident"], ctx["cameras"][job["camera"]]
    _, r = _image_stream(job, ctx)
    crng = np.random.default_rng([ctx["seed"], stable_seed(preset.name), job["pid"], job["k"], 1])
    styles = captions.pick_styles(dict(preset.styles), preset.captions_per_image, crng)
    written = [captions.write_caption(ident, r.visible, st, crng, scene=cam["scene"], min_words=preset.min_words,
                                      lexicon=dict(preset.lexicon)) for st in styles]
    entry = {
        "attributes": {k: v for k, v in ident.items() if k != "appearance"},
        "appearance": ident["appearance"],
        "visible": r.visible, "view": r.view, "facing": r.facing, "camera": job["camera"],
        "scene": cam["scene"], "boxes": r.boxes, "occluder": r.occluder, "truncated": r.truncated,
        "styles": [s.name for s in styles], "mentioned": [m for _, m in written],
    }
    return {"image": _png(r.image), "mask": _png(r.mask, MASK_PALETTE), "captions": [c for c, _ in written],
            "entry": entry}


_WORKER_CTX: dict[str, Any] = {}


def _init_worker(ctx: dict[str, Any]) -> None:
    _WORKER_CTX.update(ctx)


def _work(job: dict[str, Any]) -> dict[str, Any]:
    return make_image(job, _WORKER_CTX)


def _results(jobs: list[dict[str, Any]], ctx: dict[str, Any], workers: int) -> Iterator[dict[str, Any]]:
    """Render jobs in order, in ``workers`` processes when that pays off (results do not depend on it)."""
    if workers <= 1 or len(jobs) < 64:
        yield from (make_image(j, ctx) for j in jobs)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(ctx,)) as pool:
        yield from pool.imap(_work, jobs, chunksize=16)


def generate(preset: str, out: str | Path, seed: int = 0, ids: int | None = None,
             size: tuple[int, int] = (128, 64), difficulty: float | None = None, progress: bool = True,
             workers: int | None = None) -> Path:
    """Write a synthetic dataset in the CUHK-PEDES layout to ``out`` (which must be absent or empty).

    ``ids`` is the number of identities (default: the preset's), ``size`` = (height, width) of the
    images, ``difficulty`` in [0, 1] how alike neighbouring identities are (default: the preset's),
    ``workers`` the number of processes (default: all cores). ``TBPS_PROGRESS=0`` silences the progress
    bar whatever ``progress`` says. Returns ``out``.
    """
    p = get_preset(preset)
    n_ids = p.default_ids if ids is None else int(ids)
    diff = p.difficulty if difficulty is None else float(difficulty)
    size = _check_args(size, diff, seed)
    seed = int(seed)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} exists and is not empty; choose a new folder or delete it")
    jobs = plan(p, seed, n_ids, diff)
    ctx = {"preset": p.name, "seed": seed, "size": size, "cameras": make_cameras(p.cameras, p.name)}
    workers = workers or min(8, os.cpu_count() or 1)
    annotations, images = [], {}
    bar = progress_bar(total=len(jobs), desc=f"synthetic {p.name}", unit="img", leave=False, enabled=bool(progress))
    for job, res in zip(jobs, _results(jobs, ctx, workers)):
        rel = file_name(job)
        for folder, key in (("imgs", "image"), ("masks", "mask")):
            path = out / folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(res[key])
        annotations.append({"split": job["split"], "captions": res["captions"], "file_path": rel,
                            "id": job["pid"], "processed_tokens": [captions.tokens(c) for c in res["captions"]]})
        images[rel] = {**res["entry"], "mask": f"masks/{rel}"}
        bar.update(1)
    bar.close()
    meta = {"version": SIDECAR_VERSION, "generator": GENERATOR_VERSION, "preset": p.name, "seed": seed,
            "size": list(size), "difficulty": diff, "ids": n_ids, "part_labels": PART_LABELS,
            "slots": list(SLOTS), "cameras": ctx["cameras"], "images": images}
    (out / "reid_raw.json").write_text(json.dumps(annotations) + "\n", encoding="utf-8")
    (out / SIDECAR).write_text(json.dumps(meta) + "\n", encoding="utf-8")  # written last: marks completion
    return out


# ----------------------------------------------------------------------------------------------------
# Re-rendering a generated image with its surroundings or its person swapped


_FILE_NAME = re.compile(r"^(?P<split>[a-z]+)/(?P<pid>\d+)_c(?P<camera>\d+)_(?P<k>\d+)\.png$")


def _job_of(meta: dict[str, Any], rel: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(job, rendering context) of the image ``rel`` of a generated set, from its sidecar ``meta``."""
    if meta.get("generator") != GENERATOR_VERSION:
        raise ValueError(f"the set was made by generator version {meta.get('generator')!r}, this is version "
                         f"{GENERATOR_VERSION}: it cannot be re-rendered; regenerate the set")
    match, entry = _FILE_NAME.match(rel), meta["images"].get(rel)
    if match is None or entry is None:
        raise ValueError(f"{rel!r} is not an image of this synthetic set")
    job = {"pid": int(match["pid"]), "split": match["split"], "k": int(match["k"]), "camera": int(match["camera"]),
           "ident": {**entry["attributes"], "appearance": entry["appearance"]}}
    ctx = {"preset": meta["preset"], "seed": int(meta["seed"]), "size": tuple(meta["size"]), "cameras": meta["cameras"]}
    return job, ctx


def rerender(meta: dict[str, Any], rel: str, *, scene_camera: int | None = None, scene_seed: int = 0,
             person_from: str | None = None) -> Rendered:
    """Render the image ``rel`` of a generated set (``meta`` = its sidecar, :func:`read_meta`) again.

    Without options the result is the stored image and mask, pixel for pixel. ``scene_camera`` swaps the
    surroundings (scene crop, crowd, clutter) for those of that camera of the set's bank, drawn from a
    stream seeded by (set seed, preset, person, image, ``scene_seed``); ``person_from`` (another image of
    the set) swaps the person for that image's person, in that image's pose and placement. What is not
    swapped is the image's own draw, and so are the occluder and the camera's photometry (lighting, blur,
    noise) in both cases (:func:`~tbps_lib.data.synthetic_render.render_swapped`). Deterministic.
    """
    job, ctx = _job_of(meta, rel)
    rng, _ = _image_stream(job, ctx)
    cam = ctx["cameras"][job["camera"]]
    scene_from = person = None
    if scene_camera is not None:
        if not 0 <= int(scene_camera) < len(ctx["cameras"]):
            raise ValueError(f"scene_camera must be a camera id in [0, {len(ctx['cameras'])}), got {scene_camera}")
        scene_rng = np.random.default_rng([ctx["seed"], stable_seed(ctx["preset"], "scene"), job["pid"], job["k"],
                                           int(scene_seed)])
        scene_from = (ctx["cameras"][int(scene_camera)], scene_rng)
    if person_from is not None:
        other, _ = _job_of(meta, person_from)
        other_rng, _ = _image_stream(other, ctx)
        person = (other["ident"], ctx["cameras"][other["camera"]], other_rng)
    return render_swapped(job["ident"], cam, ctx["size"], rng, scene_from=scene_from, person_from=person)


# ----------------------------------------------------------------------------------------------------
# The cache and the sidecar


def cache_name(preset: str, seed: int = 0, ids: int | None = None, size: tuple[int, int] = (128, 64),
               difficulty: float | None = None) -> str:
    """Folder name that encodes every generation parameter (defaults resolved) and the generator version."""
    p = get_preset(preset)
    n_ids = p.default_ids if ids is None else int(ids)
    diff = p.difficulty if difficulty is None else float(difficulty)
    h, w = _check_args(size, diff, seed)
    return f"{p.name}-seed{seed}-ids{n_ids}-{h}x{w}-d{diff:g}-v{GENERATOR_VERSION}"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$TBPS_CACHE/synthetic``, else ``~/.cache/tbps_lib/synthetic``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return cache_home() / "synthetic"


def _complete(folder: Path) -> bool:
    return (folder / SIDECAR).is_file() and (folder / "reid_raw.json").is_file()


def ensure_synthetic(preset: str, seed: int = 0, ids: int | None = None, size: tuple[int, int] = (128, 64),
                     difficulty: float | None = None, cache_dir: str | Path | None = None,
                     progress: bool | None = None) -> Path:
    """The folder of a cached synthetic dataset, generated on first use.

    Generation goes to a temporary sibling folder that is renamed into place when complete, so two
    processes asking at once never see a half-written set (the loser of the race discards its copy).
    ``progress=None`` shows a progress bar unless ``TBPS_PROGRESS=0``.
    """
    name = cache_name(preset, seed, ids, size, difficulty)
    root = cache_root(cache_dir)
    final = root / name
    if _complete(final):
        return final
    if final.exists():
        raise ValueError(f"cache folder {final} exists but is incomplete (no {SIDECAR}); delete it to regenerate")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        generate(preset, tmp, seed=seed, ids=ids, size=size, difficulty=difficulty,
                 progress=True if progress is None else progress)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_mask(root: str | Path, entry: dict[str, Any]) -> np.ndarray:
    """The part-label mask (H x W, values of ``PART_LABELS``) of one sidecar entry."""
    path = Path(root).expanduser() / entry["mask"]
    if not path.is_file():
        raise FileNotFoundError(f"part mask {path} not found")
    with Image.open(path) as img:
        return np.asarray(img).copy()


__all__ = ["PRESETS", "CORPUS_PRESETS", "Preset", "avoided_signatures", "PART_LABELS", "SLOTS", "SIDECAR", "generate",
           "ensure_synthetic", "read_sidecar",
           "read_meta", "load_mask", "rerender", "cache_name", "cache_root", "split_sizes", "get_preset"]
