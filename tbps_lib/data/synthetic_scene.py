"""Cameras and surroundings of the synthetic benchmark: backgrounds, crowds, occluders, photometry.

Each preset owns a bank of cameras (:func:`make_cameras`); a camera fixes its scene (street, campus,
park, mall, corridor, parking, station), indoor/outdoor, lighting gain and colour cast, blur, noise,
resolution loss, the views it tends to see and how often people are occluded or cut off. Two presets
draw different camera banks, which is one half of the domain gap between them (captions are the other).
Everything here works on the final image size with numpy and Pillow; nothing is downloaded.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUTDOOR_SCENES = ("street", "campus", "park", "parking")
INDOOR_SCENES = ("mall", "corridor", "station")
WALL_COLORS = ((170, 160, 150), (200, 190, 170), (150, 150, 160), (180, 120, 100), (210, 205, 200),
               (120, 130, 120), (190, 200, 210), (160, 140, 120))
GROUND_COLORS = ((130, 130, 128), (150, 145, 135), (95, 95, 98), (170, 165, 150), (110, 120, 100))


@dataclass(frozen=True)
class CameraSetup:
    """How a preset's cameras are drawn (ranges are sampled once per camera).

    ``gain`` and ``cast`` set the lighting (brightness factor and per-channel colour cast), ``blur`` the
    Gaussian blur radius in pixels at 128 px height, ``noise`` the pixel noise std, ``lowres`` the
    chance that a camera loses resolution, ``crowd`` the mean number of other pedestrians behind the
    person, ``occlusion`` / ``truncation`` the chance an image is occluded / cut at the feet, and
    ``scale`` the person's height as a share of the image height. ``tone`` (per-channel gain),
    ``gamma`` and ``contrast`` are the whole camera network's colour response, shared by all its
    cameras: part of what makes one preset look different from another.
    """

    n_cameras: int
    indoor_share: float
    gain: tuple[float, float] = (0.75, 1.15)
    cast: float = 0.08
    blur: tuple[float, float] = (0.0, 0.8)
    noise: tuple[float, float] = (2.0, 7.0)
    lowres: float = 0.3
    crowd: float = 0.8
    occlusion: float = 0.15
    truncation: float = 0.05
    scale: tuple[float, float] = (0.8, 0.95)
    tone: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    contrast: float = 1.0


def stable_seed(*parts: Any) -> int:
    """A seed from strings and ints that is the same in every process and Python run (no hash())."""
    return zlib.crc32("/".join(str(p) for p in parts).encode("utf-8"))


def make_cameras(setup: CameraSetup, key: str) -> list[dict[str, Any]]:
    """Draw the camera bank of a preset; ``key`` (the preset name) makes banks differ between presets."""
    rng = np.random.default_rng(stable_seed("cameras", key))
    cams = []
    for cid in range(setup.n_cameras):
        indoor = bool(rng.random() < setup.indoor_share)
        scenes = INDOOR_SCENES if indoor else OUTDOOR_SCENES
        views = rng.dirichlet([4.0, 3.0, 2.5])
        cams.append({
            "id": cid,
            "scene": scenes[int(rng.integers(len(scenes)))],
            "indoor": indoor,
            "horizon": round(float(rng.uniform(0.35, 0.62)), 3),
            "gain": round(float(rng.uniform(*setup.gain)), 3),
            "cast": [round(float(c), 3) for c in 1.0 + rng.uniform(-setup.cast, setup.cast, 3)],
            "blur": round(float(rng.uniform(*setup.blur)), 3),
            "noise": round(float(rng.uniform(*setup.noise)), 3),
            "lowres": round(float(rng.uniform(0.45, 0.75)), 3) if rng.random() < setup.lowres else 1.0,
            "views": [round(float(v), 4) for v in views / views.sum()],
            "crowd": setup.crowd * float(rng.uniform(0.3, 1.7)),
            "occlusion": setup.occlusion,
            "truncation": setup.truncation,
            "scale": setup.scale,
            "tone": list(setup.tone), "gamma": setup.gamma, "contrast": setup.contrast,
            "texture_seed": stable_seed("texture", key, cid),
        })
    return cams


_TEXTURES: dict[tuple[int, str, int, int], np.ndarray] = {}


def background(cam: dict[str, Any], h: int, w: int, rng: np.random.Generator) -> Image.Image:
    """A fresh background for one image: a random crop of the camera's scene texture."""
    key = (cam["texture_seed"], cam["scene"], h, w)
    if key not in _TEXTURES:
        _TEXTURES[key] = _scene_texture(cam, h, 2 * w)
    tex = _TEXTURES[key]
    x0 = int(rng.integers(0, tex.shape[1] - w + 1))
    return Image.fromarray(tex[:, x0:x0 + w])


def _scene_texture(cam: dict[str, Any], h: int, w: int) -> np.ndarray:
    """Render the camera's scene once (wall/sky above the horizon, ground below, scene furniture)."""
    rng = np.random.default_rng(cam["texture_seed"])
    wall = WALL_COLORS[int(rng.integers(len(WALL_COLORS)))]
    ground = GROUND_COLORS[int(rng.integers(len(GROUND_COLORS)))]
    hy = int(cam["horizon"] * h)
    img = Image.new("RGB", (w, h), wall)
    d = ImageDraw.Draw(img)
    d.rectangle((0, hy, w, h), fill=ground)
    _SCENE_PAINTERS[cam["scene"]](d, rng, w, h, hy, wall, ground)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, 6.0, arr.shape).astype(np.float32)  # surface grain
    return np.clip(arr, 0, 255).astype(np.uint8)


def _shade(c: tuple[int, ...], f: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(v * f, 0, 255)) for v in c[:3])  # type: ignore[return-value]


def _paint_street(d, rng, w, h, hy, wall, ground):
    step = max(6, w // 10)
    for x in range(int(rng.integers(0, step)), w, step):
        for y in range(h // 12, hy - h // 10, max(8, h // 7)):
            d.rectangle((x, y, x + step // 2, y + h // 12), fill=_shade((90, 110, 140), rng.uniform(0.7, 1.2)))
    for y in range(hy + 4, h, max(4, h // 14)):
        d.line((0, y, w, y), fill=_shade(ground, 0.85), width=1)


def _paint_campus(d, rng, w, h, hy, wall, ground):
    bh, bw = max(3, h // 30), max(6, w // 16)
    for r, y in enumerate(range(0, hy, bh)):
        off = (r % 2) * bw // 2
        for x in range(-off, w, bw):
            d.rectangle((x, y, x + bw - 1, y + bh - 1), fill=_shade((150, 80, 60), rng.uniform(0.8, 1.15)))
    for x in range(0, w, max(8, w // 8)):
        d.line((x, hy, x - w // 6, h), fill=_shade(ground, 0.85))


def _paint_park(d, rng, w, h, hy, wall, ground):
    d.rectangle((0, 0, w, hy), fill=(175, 200, 225))
    for _ in range(int(w / 5)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, hy), rng.uniform(h / 20, h / 7)
        d.ellipse((x - r, y - r, x + r, y + r), fill=_shade((50, 110, 50), rng.uniform(0.6, 1.3)))
    d.rectangle((0, hy, w, h), fill=_shade((80, 140, 60), rng.uniform(0.8, 1.1)))
    d.polygon([(w * 0.3, h), (w * 0.45, hy), (w * 0.6, hy), (w * 0.8, h)], fill=(190, 175, 140))


def _paint_parking(d, rng, w, h, hy, wall, ground):
    d.rectangle((0, hy, w, h), fill=(70, 70, 74))
    x = float(rng.uniform(-w / 8, 0))
    while x < w:
        cw, ch = rng.uniform(w / 6, w / 3), rng.uniform(h / 10, h / 6)
        body = _shade(tuple(int(v) for v in rng.integers(30, 220, 3)), 1.0)
        d.rounded_rectangle((x, hy - ch, x + cw, hy + ch / 3), radius=int(ch / 4), fill=body)
        d.rectangle((x + cw * 0.2, hy - ch * 0.9, x + cw * 0.8, hy - ch * 0.5), fill=(60, 80, 100))
        x += cw + rng.uniform(2, w / 10)
    for y in range(hy + h // 8, h, h // 6):
        d.line((0, y, w, y), fill=(220, 220, 210), width=1)


def _paint_mall(d, rng, w, h, hy, wall, ground):
    x = 0.0
    while x < w:
        sw = rng.uniform(w / 8, w / 4)
        d.rectangle((x, h // 10, x + sw - 2, hy - 2), fill=(200, 225, 235))
        sign = tuple(int(v) for v in rng.integers(40, 240, 3))
        d.rectangle((x, h // 14, x + sw - 2, h // 14 + max(3, h // 18)), fill=sign)
        x += sw
    d.rectangle((0, hy, w, h), fill=(215, 210, 200))
    for y in range(hy, h, max(5, h // 12)):
        d.line((0, y, w, y), fill=(185, 180, 170))


def _paint_corridor(d, rng, w, h, hy, wall, ground):
    for x in range(int(rng.integers(0, w // 4)), w, max(12, w // 3)):
        d.rectangle((x, int(hy * 0.3), x + max(5, w // 10), hy), fill=(120, 85, 55))
    tile = max(4, h // 14)
    for i, y in enumerate(range(hy, h, tile)):
        for j, x in enumerate(range(0, w, tile * 2)):
            if (i + j) % 2:
                d.rectangle((x, y, x + tile * 2 - 1, y + tile - 1), fill=_shade(ground, 0.9))


def _paint_station(d, rng, w, h, hy, wall, ground):
    for x in range(int(rng.integers(0, w // 3)), w, max(16, w // 2)):
        d.rectangle((x, 0, x + max(4, w // 12), hy + h // 20), fill=_shade(wall, 0.75))
    d.rectangle((0, h // 8, w, h // 8 + max(3, h // 20)), fill=(30, 60, 130))
    d.rectangle((0, hy, w, h), fill=(160, 160, 150))
    d.line((0, hy + h // 10, w, hy + h // 10), fill=(230, 200, 40), width=max(1, h // 60))


_SCENE_PAINTERS = {"street": _paint_street, "campus": _paint_campus, "park": _paint_park,
                   "parking": _paint_parking, "mall": _paint_mall, "corridor": _paint_corridor,
                   "station": _paint_station}


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(20, 235, 3))  # type: ignore[return-value]


def pedestrian_silhouette(d: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, foot_y: float,
                          height: float, fill_label: int | None = None,
                          label_draw: ImageDraw.ImageDraw | None = None) -> None:
    """A simple other person (head, torso, legs) of the given height, standing at (cx, foot_y)."""
    top = foot_y - height
    hw = height * 0.12
    parts = [
        ("ellipse", (cx - height * 0.045, top, cx + height * 0.045, top + height * 0.12), _crowd_skin(rng)),
        ("rect", (cx - hw, top + height * 0.14, cx + hw, top + height * 0.52), _random_color(rng)),
        ("rect", (cx - hw * 0.8, top + height * 0.5, cx + hw * 0.8, foot_y), _random_color(rng)),
    ]
    for kind, box, color in parts:
        (d.ellipse if kind == "ellipse" else d.rectangle)(box, fill=color)
        if label_draw is not None:
            (label_draw.ellipse if kind == "ellipse" else label_draw.rectangle)(box, fill=fill_label)


def _crowd_skin(rng: np.random.Generator) -> tuple[int, int, int]:
    """A skin-like colour for the faceless crowd."""
    t = rng.uniform(0.45, 1.0)
    return (int(235 * t), int(195 * t), int(165 * t))


def add_crowd(img: Image.Image, cam: dict[str, Any], rng: np.random.Generator) -> None:
    """Draw other pedestrians and clutter behind the person (part of the background, label 0)."""
    w, h = img.size
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.poisson(cam["crowd"]))):
        height = h * rng.uniform(0.45, 0.85)
        foot = cam["horizon"] * h + height * rng.uniform(0.35, 0.6)
        cx = rng.choice([rng.uniform(-0.15, 0.25), rng.uniform(0.75, 1.15)]) * w
        pedestrian_silhouette(d, rng, cx, foot, height)
    for _ in range(int(rng.poisson(0.6))):  # bins, signs, planters
        x, y = rng.uniform(0, w), rng.uniform(cam["horizon"] * h, h)
        bw, bh = rng.uniform(w / 12, w / 5), rng.uniform(h / 12, h / 5)
        d.rectangle((x, y - bh, x + bw, y), fill=_random_color(rng))


def add_occluder(img: Image.Image, mask: Image.Image, label: int, rng: np.random.Generator) -> str:
    """Draw one thing in front of the person (a low object, a pole or a passer-by); return its kind."""
    w, h = img.size
    d, m = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    kind = ("low", "pole", "passerby")[int(rng.choice(3, p=[0.45, 0.2, 0.35]))]
    if kind == "low":
        top = h * (1.0 - rng.uniform(0.12, 0.3))
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * w)
        x0, x1 = min(x0, w * 0.2), max(x1, w * 0.8)
        box = (x0, top, x1, h)
        d.rectangle(box, fill=_random_color(rng))
        m.rectangle(box, fill=label)
    elif kind == "pole":
        x = rng.uniform(0.15, 0.85) * w
        box = (x - w * 0.04, 0, x + w * 0.04, h)
        d.rectangle(box, fill=_shade((90, 90, 95), rng.uniform(0.6, 1.6)))
        m.rectangle(box, fill=label)
    else:
        height = h * rng.uniform(1.0, 1.3)
        cx = (rng.choice([-0.22, 1.22]) + rng.uniform(-0.06, 0.06)) * w
        pedestrian_silhouette(d, rng, cx, h + height * 0.05, height, label, m)
    return kind


def photometric(img: Image.Image, cam: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Camera look: resolution loss, blur, colour response, lighting gain and cast, noise (uint8 HxWx3)."""
    w, h = img.size
    if cam["lowres"] < 1.0:
        small = (max(8, int(w * cam["lowres"])), max(16, int(h * cam["lowres"])))
        img = img.resize(small, Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
    radius = cam["blur"] * h / 128.0 * rng.uniform(0.7, 1.3)
    if radius > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(img, dtype=np.float32)
    arr = 255.0 * (arr / 255.0) ** cam["gamma"]
    arr = (arr - 128.0) * cam["contrast"] + 128.0
    arr *= np.asarray(cam["tone"], dtype=np.float32)
    gain = cam["gain"] * rng.uniform(0.9, 1.1)
    cast = np.asarray(cam["cast"], dtype=np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    arr = arr * (gain * cast)
    arr += rng.normal(0.0, cam["noise"], arr.shape).astype(np.float32)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)
