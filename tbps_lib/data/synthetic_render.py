"""Drawing one synthetic pedestrian image, with its part-label mask, part boxes and visible slots.

A person is built from parts (head, hair, headwear, eyewear, torso/upper garment, arms, lower
garment, legs, shoes, bag, held object) in person units: ``u`` across (0 = body axis, 1 = the person's
height) and ``v`` down from the top of the head (0..1). The view (front, back, side) decides which parts
are drawn and in which order, so a backpack shows from behind and glasses from the front. The person is
drawn at 2x (for images under 256 px high) into an RGB layer and a label layer at once, then box-filtered
down and composited on the camera's background; the label layer becomes the part mask, so mask, boxes
and pixels agree by construction. Occluders are drawn on top with their own label. One image's stream
draws three layers in order, the person, the surroundings, then the occluder and camera photometry;
:func:`render_swapped` takes the person or the surroundings from another stream and keeps the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tbps_lib.data import synthetic_scene as scene
from tbps_lib.data.synthetic_attributes import SKIN_TONES, SLOTS

PART_LABELS: dict[str, int] = {
    "background": 0, "head": 1, "hair": 2, "headwear": 3, "eyewear": 4, "upper": 5, "arms": 6,
    "lower": 7, "legs": 8, "shoes": 9, "bag": 10, "held": 11, "occluder": 12,
}
L = PART_LABELS
# Part colours for viewing masks (the PNG palette); index = label.
MASK_PALETTE = [(0, 0, 0), (250, 200, 160), (120, 70, 20), (255, 0, 255), (0, 255, 255), (255, 60, 60),
                (255, 170, 120), (60, 90, 255), (200, 150, 110), (255, 230, 0), (0, 200, 90),
                (150, 0, 255), (128, 128, 128)]
# Smallest pixel count (at 128x64; scaled with the image area) for a slot to count as visible.
MIN_PIXELS = {"hair": 8, "headwear": 8, "eyewear": 3, "upper": 40, "lower": 30, "shoes": 8, "bag": 12,
              "held": 4}
MIN_VISIBLE_SHARE = 0.5  # ... and at least this share of the part's pixels before occlusion


@dataclass
class Rendered:
    """One rendered image: RGB pixels, part-label mask and what the caption writer may mention."""

    image: np.ndarray
    mask: np.ndarray
    view: str
    facing: str | None
    boxes: dict[str, list[int]]
    visible: list[str]
    occluder: str | None
    truncated: bool


class _Painter:
    """Draws shapes given in person units into an RGB layer and a label layer at the same time."""

    def __init__(self, size: tuple[int, int], cx: float, y0: float, hp: float, mirror: int) -> None:
        self.rgb = Image.new("RGB", size, (0, 0, 0))
        self.lab = Image.new("L", size, 0)
        self.cx, self.y0, self.hp, self.mirror = cx, y0, hp, mirror
        self._refresh()

    def _refresh(self) -> None:
        self.d, self.m = ImageDraw.Draw(self.rgb), ImageDraw.Draw(self.lab)

    def pt(self, u: float, v: float) -> tuple[float, float]:
        return (self.cx + self.mirror * u * self.hp, self.y0 + v * self.hp)

    def box(self, u0: float, v0: float, u1: float, v1: float) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = self.pt(u0, v0), self.pt(u1, v1)
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    def poly(self, pts: list[tuple[float, float]], color, label: int) -> None:
        xy = [self.pt(u, v) for u, v in pts]
        self.d.polygon(xy, fill=tuple(color))
        self.m.polygon(xy, fill=label)

    def ellipse(self, u0, v0, u1, v1, color, label: int) -> None:
        b = self.box(u0, v0, u1, v1)
        self.d.ellipse(b, fill=tuple(color))
        self.m.ellipse(b, fill=label)

    def rect(self, u0, v0, u1, v1, color, label: int, radius: float = 0.0) -> None:
        b = self.box(u0, v0, u1, v1)
        r = int(radius * self.hp)
        self.d.rounded_rectangle(b, radius=r, fill=tuple(color))
        self.m.rounded_rectangle(b, radius=r, fill=label)

    def top_chord(self, u0, v0, u1, v1, color, label: int) -> None:
        """The upper half of an ellipse (hair tops, caps, beanies)."""
        b = self.box(u0, v0, u1, v1)
        self.d.chord(b, 180, 360, fill=tuple(color))
        self.m.chord(b, 180, 360, fill=label)

    def line(self, pts: list[tuple[float, float]], width: float, color, label: int) -> None:
        xy = [self.pt(u, v) for u, v in pts]
        w = max(1, int(round(width * self.hp)))
        self.d.line(xy, fill=tuple(color), width=w, joint="curve")
        self.m.line(xy, fill=label, width=w, joint="curve")
        for x, y in (xy[0], xy[-1]):  # round caps so limbs have no square ends
            r = w / 2.0
            self.d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(color))
            self.m.ellipse((x - r, y - r, x + r, y + r), fill=label)

    def apply_pattern(self, pattern: str, color, period_u: float = 0.045) -> None:
        """Paint stripes, plaid or dots over every pixel currently labelled as upper garment."""
        if pattern == "solid":
            return
        rgb, lab = np.array(self.rgb), np.asarray(self.lab)
        rows, cols = np.flatnonzero((lab == L["upper"]).any(axis=1)), np.flatnonzero((lab == L["upper"]).any(axis=0))
        if rows.size == 0:
            return
        sub = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        yy, xx = np.mgrid[sub]
        p = max(3.0, period_u * self.hp)
        fy, fx = ((yy - self.y0) % p) / p, ((xx - self.cx) % p) / p
        if pattern == "striped":
            pat = fy < 0.45
        elif pattern == "plaid":
            pat = (fy < 0.3) | (fx < 0.3)
        elif pattern == "dotted":
            row = ((yy - self.y0) // p) % 2
            fx2 = ((xx - self.cx + row * p / 2) % p) / p
            pat = (fy - 0.5) ** 2 + (fx2 - 0.5) ** 2 < 0.22 ** 2
        else:
            raise ValueError(f"unknown pattern {pattern!r}")
        rgb[sub][(lab[sub] == L["upper"]) & pat] = color
        self.rgb = Image.fromarray(rgb)
        self._refresh()


def _shade(c, f: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(v * f, 0, 255)) for v in c)  # type: ignore[return-value]


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(x * (1 - t) + y * t) for x, y in zip(a, b))  # type: ignore[return-value]


def _side_sign(side: str, view: str) -> int:
    """Image side (-1 left, +1 right) of the person's ``side`` hand in a front or back view."""
    s = 1 if side == "left" else -1
    return s if view == "front" else -s


@dataclass
class _Body:
    """Per-image geometry shared by the part painters (person units)."""

    view: str
    sw: float
    ww: float
    hw: float
    legs: list[tuple[float, float, float]]  # (u at hip, u at ankle, shade), far leg first
    arms: dict[int, list[tuple[float, float]]]  # image side -> shoulder, elbow, wrist
    held_side: int
    bag_side: int
    near: str  # the person's side facing the camera in a side view (right when facing image-right)


def _body(ident: dict[str, Any], view: str, facing: int, rng: np.random.Generator) -> _Body:
    """Shoulder/waist/hip widths, leg and arm positions for the view, and which hands hold things."""
    b = ident["appearance"]["build"]
    female = ident["gender"] == "female"
    sw, ww, hw = (0.105 if female else 0.118) * b, 0.086 * b, (0.102 if female else 0.096) * b
    bag_hand = ident["bag"] in ("handbag", "suitcase")
    person_held = ("right" if ident["bag_side"] == "left" else "left") if bag_hand else "right"
    if view == "side":
        stride = rng.uniform(0.02, 0.09)
        swing = rng.uniform(-0.06, 0.06)
        wrist = (0.08, 0.29) if ident["held"] == "phone" else (swing, 0.465)
        elbow = (0.03, 0.32) if ident["held"] == "phone" else (swing * 0.5, 0.325)
        return _Body(view, 0.07 * b, 0.066 * b, 0.07 * b, [(-0.005, -stride, 0.8), (0.005, stride, 1.0)],
                     {1: [(0.0, 0.18), elbow, wrist]}, 1, 1, "right" if facing > 0 else "left")
    spread = rng.uniform(0.0, 0.025)
    held_side = _side_sign(person_held, view)
    arms = {}
    for s in (-1, 1):
        if view == "front" and ident["held"] == "phone" and s == held_side:
            arms[s] = [(s * (sw - 0.015), 0.175), (s * (sw + 0.01), 0.32), (s * 0.04, 0.33)]
        else:
            out = rng.uniform(0.0, 0.015)
            arms[s] = [(s * (sw - 0.015), 0.175), (s * (sw + 0.008 + out), 0.33), (s * (sw + out), 0.465)]
    bag_side = _side_sign(ident["bag_side"], view) if ident["bag_side"] else 1
    legs = [(s * 0.05, s * (0.05 + spread), 1.0) for s in (-1, 1)]
    return _Body(view, sw, ww, hw, legs, arms, held_side, bag_side, "")


def _rgb(ident: dict[str, Any], key: str) -> tuple[int, int, int]:
    return tuple(ident["appearance"]["rgb"][key])  # type: ignore[return-value]


def _draw_legs(p: _Painter, ident: dict[str, Any], body: _Body, skin) -> None:
    """Legs (skin or garment), the lower garment and the shoes."""
    lower = ident["lower"]
    lc = _rgb(ident, "lower_color") if lower else None
    full = lower in ("jeans", "trousers", "leggings")
    top_w, bot_w = {"leggings": (0.045, 0.027), "trousers": (0.054, 0.036)}.get(lower, (0.052, 0.032))
    for ut, ub, shade in body.legs:
        quad = [(ut - top_w, 0.47), (ut + top_w, 0.47), (ub + bot_w, 0.935), (ub - bot_w, 0.935)]
        if full:
            p.poly(quad, _shade(lc, shade), L["lower"])
        else:
            p.poly(quad, _shade(skin, shade), L["legs"])
            if lower == "shorts":
                um = ut + (ub - ut) * 0.35
                p.poly([(ut - 0.058, 0.47), (ut + 0.058, 0.47), (um + 0.05, 0.64), (um - 0.05, 0.64)],
                       _shade(lc, shade), L["lower"])
        _draw_shoe(p, ident, ub, shade, body.view == "side", skin)
    if full or lower == "shorts":
        p.rect(-body.hw, 0.46, body.hw, 0.56, lc, L["lower"])
    if lower == "skirt":
        hem = 0.145 if body.view != "side" else 0.11
        p.poly([(-body.hw, 0.46), (body.hw, 0.46), (hem, 0.69), (-hem - 0.01, 0.69)], lc, L["lower"])


def _draw_shoe(p: _Painter, ident: dict[str, Any], u: float, shade: float, side: bool, skin) -> None:
    c = _shade(_rgb(ident, "shoes_color"), shade)
    kind = ident["shoes"]
    back, front = (0.03, 0.065) if side else (0.042, 0.042)
    if kind == "boots":
        p.rect(u - 0.038, 0.85, u + 0.038, 0.99, c, L["shoes"])
        p.ellipse(u - back, 0.94, u + front, 1.0, c, L["shoes"])
    elif kind == "sandals":
        p.ellipse(u - back, 0.93, u + front, 0.995, skin, L["legs"])
        p.rect(u - back, 0.975, u + front, 1.0, c, L["shoes"])
        p.line([(u - back * 0.8, 0.945), (u + front * 0.8, 0.955)], 0.012, c, L["shoes"])
    elif kind == "heels":
        p.ellipse(u - back * 0.8, 0.93, u + front * 0.8, 0.985, c, L["shoes"])
        p.line([(u - back * 0.6, 0.97), (u - back * 0.6, 1.0)], 0.01, c, L["shoes"])
    else:
        p.ellipse(u - back, 0.925, u + front, 1.0, c, L["shoes"])
        if kind == "sneakers":
            p.rect(u - back, 0.985, u + front, 1.0, (235, 235, 230), L["shoes"])


HEMS = {"coat": 0.72, "jacket": 0.545, "hoodie": 0.53, "dress": 0.47}


def _draw_torso(p: _Painter, ident: dict[str, Any], body: _Body, skin) -> None:
    """Neck, the upper garment (coat, dress skirt, hood, collar) and both sleeves/arms; then its pattern."""
    upper, uc = ident["upper"], _rgb(ident, "upper_color")
    p.rect(-0.02, 0.11, 0.02, 0.175, skin, L["head"])
    sw, ww, hw = body.sw, body.ww, body.hw
    hem = HEMS.get(upper, 0.515)
    if body.view == "side":
        pts = [(-0.07, 0.165), (0.06, 0.165), (0.07, 0.34), (0.065, hem), (-0.075, hem), (-0.08, 0.34)]
    else:
        flare = 0.03 if upper == "coat" else 0.0
        pts = [(-sw + 0.02, 0.155), (sw - 0.02, 0.155), (sw, 0.18), (ww, 0.34), (hw + flare, hem),
               (-hw - flare, hem), (-ww, 0.34), (-sw, 0.18)]
    p.poly(pts, uc, L["upper"])
    if upper == "dress":
        hemw = 0.15 if body.view != "side" else 0.12
        p.poly([(-hw, 0.45), (hw, 0.45), (hemw, 0.72), (-hemw - 0.01, 0.72)], uc, L["upper"])
    if upper == "hoodie":
        if body.view == "back":
            p.ellipse(-0.065, 0.13, 0.065, 0.25, _shade(uc, 0.9), L["upper"])
        elif body.view == "side":
            p.ellipse(-0.095, 0.12, -0.02, 0.22, _shade(uc, 0.9), L["upper"])
    for side, (sh, el, wr) in body.arms.items():
        _draw_arm(p, ident, sh, el, wr, skin)
    p.apply_pattern(ident["upper_pattern"], _rgb(ident, "upper_pattern_color")
                    if ident["upper_pattern_color"] else uc)
    if body.view == "front":
        _draw_front_details(p, upper, uc)


def _draw_arm(p: _Painter, ident: dict[str, Any], sh, el, wr, skin) -> None:
    uc = _rgb(ident, "upper_color")
    if ident["sleeve"] == "short":
        mid = (sh[0] + (el[0] - sh[0]) * 0.7, sh[1] + (el[1] - sh[1]) * 0.7)
        p.line([sh, el, wr], 0.04, skin, L["arms"])
        p.line([sh, mid], 0.052, uc, L["upper"])
    else:
        p.line([sh, el, wr], 0.046, uc, L["upper"])
    hand = (wr[0], wr[1] + 0.018)
    p.ellipse(hand[0] - 0.02, hand[1] - 0.022, hand[0] + 0.02, hand[1] + 0.022, skin, L["arms"])


def _draw_front_details(p: _Painter, upper: str, uc) -> None:
    """What tells garments apart from the front: an open jacket, a shirt collar, a hood, a sweater hem."""
    light = (236, 236, 232) if sum(uc) < 360 else (40, 40, 44)
    if upper == "jacket":
        p.rect(-0.018, 0.17, 0.018, 0.54, light, L["upper"])
    elif upper == "shirt":
        p.poly([(-0.035, 0.155), (0.0, 0.2), (-0.005, 0.155)], _shade(uc, 1.25), L["upper"])
        p.poly([(0.035, 0.155), (0.0, 0.2), (0.005, 0.155)], _shade(uc, 1.25), L["upper"])
        p.line([(0.0, 0.2), (0.0, 0.5)], 0.006, _shade(uc, 0.7), L["upper"])
    elif upper == "hoodie":
        p.ellipse(-0.06, 0.125, 0.06, 0.2, _shade(uc, 0.85), L["upper"])
        p.line([(-0.015, 0.19), (-0.015, 0.27)], 0.008, light, L["upper"])
        p.line([(0.015, 0.19), (0.015, 0.27)], 0.008, light, L["upper"])
    elif upper == "sweater":
        p.rect(-0.09, 0.49, 0.09, 0.515, _shade(uc, 0.75), L["upper"])


def _draw_head(p: _Painter, ident: dict[str, Any], body: _Body, skin) -> None:
    """Head, face, hair, glasses and headwear, in the order the view needs."""
    hc = _rgb(ident, "hair_color") if ident["hair_color"] else None
    length, style = ident["hair_length"], ident["hair_style"]
    if body.view == "front" and hc and length in ("medium", "long"):
        p.ellipse(-0.058, -0.012, 0.058, 0.15 if length == "medium" else 0.17, hc, L["hair"])
    p.ellipse(-0.046, 0.005, 0.046, 0.128, skin, L["head"])
    if body.view == "front":
        for s in (-1, 1):
            p.ellipse(s * 0.018 - 0.006, 0.056, s * 0.018 + 0.006, 0.068, (40, 30, 30), L["head"])
    elif body.view == "side":
        p.poly([(0.043, 0.052), (0.058, 0.074), (0.042, 0.08)], skin, L["head"])
        p.ellipse(0.022, 0.056, 0.034, 0.068, (40, 30, 30), L["head"])
    if hc:
        _draw_hair(p, body.view, length, style, hc)
    if body.view != "back" and ident["eyewear"] != "none":
        _draw_eyewear(p, ident["eyewear"], body.view, skin)
    if ident["headwear"] != "none":
        _draw_headwear(p, ident["headwear"], _rgb(ident, "headwear_color"), body.view)


def _draw_hair(p: _Painter, view: str, length: str, style: str, hc) -> None:
    p.top_chord(-0.052, -0.014, 0.052, 0.11, hc, L["hair"])
    if style == "curly":
        for u in (-0.04, -0.02, 0.0, 0.02, 0.04):
            p.ellipse(u - 0.018, -0.016, u + 0.018, 0.02, hc, L["hair"])
    down = {"short": 0.1, "medium": 0.16, "long": 0.29}[length]
    if view == "back":
        p.ellipse(-0.052, -0.014, 0.052, min(0.14, down + 0.03), hc, L["hair"])
        if length == "long":
            p.poly([(-0.055, 0.08), (0.055, 0.08), (0.07, down), (-0.07, down)], hc, L["hair"])
    elif view == "side":
        p.poly([(-0.052, 0.04), (0.0, 0.02), (-0.005, 0.09), (-0.05, down)], hc, L["hair"])
    elif length == "long":
        for s in (-1, 1):
            p.poly([(s * 0.04, 0.06), (s * 0.058, 0.06), (s * 0.075, down), (s * 0.05, down)], hc, L["hair"])
    if style == "ponytail" and view != "front":
        u0 = -0.06 if view == "side" else -0.015
        p.rect(u0, 0.05, u0 + 0.03, 0.24, hc, L["hair"], radius=0.012)


def _draw_eyewear(p: _Painter, kind: str, view: str, skin) -> None:
    frame = (25, 25, 30)
    lens = (20, 20, 26) if kind == "sunglasses" else _mix(skin, (200, 225, 240), 0.5)
    boxes = [(-0.04, -0.004), (0.004, 0.04)] if view == "front" else [(0.018, 0.05)]
    for u0, u1 in boxes:
        p.rect(u0, 0.05, u1, 0.075, frame, L["eyewear"])
        p.rect(u0 + 0.006, 0.056, u1 - 0.006, 0.069, lens, L["eyewear"])
    if view == "side":
        p.line([(0.02, 0.058), (-0.01, 0.06)], 0.006, frame, L["eyewear"])


def _draw_headwear(p: _Painter, kind: str, c, view: str) -> None:
    if kind == "beanie":
        p.top_chord(-0.056, -0.032, 0.056, 0.13, c, L["headwear"])
        p.rect(-0.056, 0.03, 0.056, 0.052, _shade(c, 0.85), L["headwear"])
        return
    p.top_chord(-0.053, -0.022, 0.053, 0.1, c, L["headwear"])
    if kind == "hat":
        p.ellipse(-0.095, 0.022, 0.095, 0.052, _shade(c, 0.9), L["headwear"])
    elif view == "front":
        p.ellipse(-0.05, 0.028, 0.05, 0.052, _shade(c, 0.85), L["headwear"])
    elif view == "side":
        p.poly([(0.02, 0.03), (0.1, 0.035), (0.1, 0.045), (0.02, 0.045)], _shade(c, 0.85), L["headwear"])


def _draw_bag(p: _Painter, ident: dict[str, Any], body: _Body, stage: str) -> None:
    """Bags at their stage: ``behind`` (suitcase, backpack in side view) or ``front`` (the rest)."""
    kind, view = ident["bag"], body.view
    if kind == "none":
        return
    c = _rgb(ident, "bag_color")
    near = view != "side" or ident["bag_side"] in (None, body.near)
    if stage == "behind":
        if kind == "suitcase":
            u = -0.2 if view == "side" else body.bag_side * (body.sw + 0.1)
            p.rect(u - 0.07, 0.62, u + 0.07, 0.985, c, L["bag"], radius=0.01)
            hand = body.arms[1 if view == "side" else body.bag_side][2]
            p.line([(u, 0.62), (hand[0], hand[1] + 0.02)], 0.01, (60, 60, 64), L["bag"])
        elif kind == "backpack" and view == "side":
            p.rect(-0.15, 0.19, -0.04, 0.43, c, L["bag"], radius=0.02)
        return
    if kind == "backpack" and view == "back":
        p.rect(-0.095, 0.19, 0.095, 0.44, c, L["bag"], radius=0.025)
        p.rect(-0.06, 0.3, 0.06, 0.4, _shade(c, 0.8), L["bag"], radius=0.01)
    elif kind == "handbag" and near:
        hand = body.arms[1 if view == "side" else body.bag_side][2]
        p.line([(hand[0] - 0.025, 0.5), (hand[0], 0.475), (hand[0] + 0.025, 0.5)], 0.008, c, L["bag"])
        p.rect(hand[0] - 0.045, 0.5, hand[0] + 0.045, 0.585, c, L["bag"], radius=0.01)
    elif kind == "shoulder bag" and near:
        s = 1 if view == "side" else body.bag_side
        u = -0.02 if view == "side" else s * (body.hw + 0.02)
        if view != "side":
            p.line([(-s * body.sw * 0.7, 0.165), (u, 0.46)], 0.012, c, L["bag"])
        p.rect(u - 0.045, 0.44, u + 0.045, 0.55, c, L["bag"], radius=0.01)


def _draw_held(p: _Painter, ident: dict[str, Any], body: _Body) -> None:
    kind, view = ident["held"], body.view
    if kind == "none" or (kind == "phone" and view == "back"):
        return
    hu, hv = body.arms[1 if view == "side" else body.held_side][2]
    if kind == "umbrella":
        c = _rgb(ident, "held_color")
        tip = hu + (0.07 if view == "side" else np.sign(hu) * 0.05)
        p.line([(hu, hv + 0.01), (tip, 0.96)], 0.03, c, L["held"])
        p.line([(hu, hv + 0.01), (hu, hv - 0.02)], 0.01, (50, 40, 30), L["held"])
    elif kind == "phone":
        p.rect(hu - 0.018, hv - 0.04, hu + 0.018, hv + 0.012, (35, 35, 40), L["held"], radius=0.004)
    elif kind == "cup":
        p.rect(hu - 0.02, hv + 0.005, hu + 0.02, hv + 0.065, (240, 240, 236), L["held"])
        p.rect(hu - 0.022, hv, hu + 0.022, hv + 0.014, (90, 60, 40), L["held"])


def draw_person(size: tuple[int, int], ident: dict[str, Any], view: str, facing: int, cx: float, y0: float,
                hp: float, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Draw the person alone (black background) at canvas ``size``; return (RGB, labels)."""
    p = _Painter(size, cx, y0, hp, facing)
    body = _body(ident, view, facing, rng)
    skin = SKIN_TONES[ident["appearance"]["skin"]]
    _draw_bag(p, ident, body, "behind")
    if view == "front" and ident["hair_color"] and ident["hair_length"] == "long":
        p.rect(-0.07, 0.05, 0.07, 0.28, _rgb(ident, "hair_color"), L["hair"])  # hair behind shoulders
    _draw_legs(p, ident, body, skin)
    _draw_torso(p, ident, body, skin)
    if view == "back":
        _draw_head(p, ident, body, skin)
        _draw_bag(p, ident, body, "front")
        _draw_held(p, ident, body)
    else:
        _draw_bag(p, ident, body, "front")
        _draw_held(p, ident, body)
        _draw_head(p, ident, body, skin)
    return p.rgb, p.lab


def _downsample(rgb: Image.Image, lab: Image.Image, ss: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box-filter the person layer by ``ss``: premultiplied colour, coverage alpha, nearest labels.

    The layer is drawn on black, so its colours are already premultiplied by the 0/1 coverage.
    """
    lab_a = np.asarray(lab)
    cover = Image.fromarray(((lab_a > 0) * 255).astype(np.uint8))
    if ss > 1:
        rgb, cover = rgb.reduce(ss), cover.reduce(ss)
        labels = lab_a[ss // 2::ss, ss // 2::ss].copy()
    else:
        labels = lab_a.copy()
    return np.asarray(rgb, dtype=np.float32), np.asarray(cover, dtype=np.float32) / 255.0, labels


def boxes_from_mask(mask: np.ndarray) -> dict[str, list[int]]:
    """Tight box ``[x0, y0, x1, y1]`` (x1, y1 exclusive) of every part label present in ``mask``."""
    out: dict[str, list[int]] = {}
    present = np.bincount(mask.ravel(), minlength=len(PART_LABELS))
    for name, lab in PART_LABELS.items():
        if lab == 0 or not present[lab]:
            continue
        hit = mask == lab
        ys, xs = np.flatnonzero(hit.any(axis=1)), np.flatnonzero(hit.any(axis=0))
        out[name] = [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]
    return out


def visible_slots(mask: np.ndarray, before: np.ndarray, ident: dict[str, Any]) -> list[str]:
    """Slots a caption may mention: enough pixels, and enough of them left after occlusion."""
    area = mask.size / (128 * 64)
    now = np.bincount(mask.ravel(), minlength=len(PART_LABELS))
    pre = np.bincount(before.ravel(), minlength=len(PART_LABELS))
    out = ["gender"]
    for slot in SLOTS:
        if slot == "hair" and ident["hair_length"] == "bald":
            n, n0 = now[L["head"]], pre[L["head"]]  # a bald head is a visible hair attribute
        else:
            n, n0 = now[L[slot]], pre[L[slot]]
        if n >= MIN_PIXELS[slot] * area and n >= MIN_VISIBLE_SHARE * n0:
            out.append(slot)
    return out


@dataclass
class _PersonLayer:
    """The person drawn alone, downsampled (premultiplied colour, coverage, labels) and where."""

    ident: dict[str, Any]
    fg: np.ndarray
    alpha: np.ndarray
    labels: np.ndarray
    view: str
    facing: int
    truncated: bool


def _person_layer(ident: dict[str, Any], cam: dict[str, Any], size: tuple[int, int],
                  rng: np.random.Generator) -> _PersonLayer:
    """Draw the person: view, facing, scale and placement for ``cam``, then the parts (first draws of a stream)."""
    h, w = size
    views = np.asarray(cam["views"], dtype=float)
    view = ("front", "back", "side")[int(rng.choice(3, p=views / views.sum()))]
    facing = int(rng.choice([-1, 1])) if view == "side" else 1
    ss = 2 if h < 256 else 1
    hp = h * rng.uniform(*cam["scale"]) * ident["appearance"]["height"]
    y0 = (h - hp) / 2 + rng.uniform(-0.03, 0.03) * h
    truncated = bool(rng.random() < cam["truncation"])
    if truncated:
        y0 += hp * rng.uniform(0.07, 0.13)
    cx = w / 2 + rng.uniform(-0.07, 0.07) * w
    rgb, lab = draw_person((w * ss, h * ss), ident, view, facing, cx * ss, y0 * ss, hp * ss, rng)
    fg, alpha, labels = _downsample(rgb, lab, ss)
    _shade_person(fg, cx, hp)
    return _PersonLayer(ident, fg, alpha, labels, view, facing, truncated)


def _scene_layer(cam: dict[str, Any], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """The surroundings behind the person: a crop of ``cam``'s scene and its crowd and clutter."""
    bg = scene.background(cam, size[0], size[1], rng)
    scene.add_crowd(bg, cam, rng)
    return bg


def _finish(person: _PersonLayer, bg: Image.Image, cam: dict[str, Any], rng: np.random.Generator) -> Rendered:
    """Composite the person on ``bg``, then the occluder and ``cam``'s photometry (last draws of a stream)."""
    comp = np.asarray(bg, dtype=np.float32) * (1.0 - person.alpha[..., None]) + person.fg
    img = Image.fromarray(np.clip(comp + 0.5, 0, 255).astype(np.uint8))
    before = person.labels.copy()
    mask_img = Image.fromarray(person.labels.copy())
    occluder = scene.add_occluder(img, mask_img, L["occluder"], rng) if rng.random() < cam["occlusion"] else None
    mask = np.asarray(mask_img).copy()
    image = scene.photometric(img, cam, rng)
    return Rendered(image=image, mask=mask, view=person.view,
                    facing=None if person.view != "side" else ("right" if person.facing > 0 else "left"),
                    boxes=boxes_from_mask(mask), visible=visible_slots(mask, before, person.ident),
                    occluder=occluder, truncated=person.truncated)


def render_image(ident: dict[str, Any], cam: dict[str, Any], size: tuple[int, int],
                 rng: np.random.Generator) -> Rendered:
    """Render one image of ``ident`` seen by ``cam`` at ``size`` = (height, width)."""
    person = _person_layer(ident, cam, size, rng)
    return _finish(person, _scene_layer(cam, size, rng), cam, rng)


def render_swapped(ident: dict[str, Any], cam: dict[str, Any], size: tuple[int, int], rng: np.random.Generator,
                   *, scene_from: tuple[dict[str, Any], np.random.Generator] | None = None,
                   person_from: tuple[dict[str, Any], dict[str, Any], np.random.Generator] | None = None
                   ) -> Rendered:
    """:func:`render_image` of (``ident``, ``cam``, ``rng``) with one layer taken from elsewhere.

    ``scene_from`` = (camera, stream): the surroundings (scene crop, crowd, clutter) are that camera's,
    drawn from that stream, instead of the image's own; ``person_from`` = (identity, camera, stream): the
    person (pose, scale, placement, parts) is drawn from that image's stream instead. Everything else
    comes from ``rng`` exactly as :func:`render_image` draws it (the image's own layers are drawn and
    discarded to keep the stream in step): the occluder and ``cam``'s photometry (lighting, blur, noise).
    With neither argument the result is :func:`render_image`'s.
    """
    person = _person_layer(ident, cam, size, rng)
    bg = _scene_layer(cam, size, rng)
    if person_from is not None:
        other_ident, other_cam, other_rng = person_from
        person = _person_layer(other_ident, other_cam, size, other_rng)
    if scene_from is not None:
        bg = _scene_layer(scene_from[0], size, scene_from[1])
    return _finish(person, bg, cam, rng)


def _shade_person(fg: np.ndarray, cx: float, hp: float) -> None:
    """Round the body a little: darken towards the silhouette's sides (in place, premultiplied colour)."""
    xs = np.arange(fg.shape[1], dtype=np.float32)
    f = 1.0 - 0.18 * np.clip(np.abs(xs - cx) / (0.16 * hp), 0.0, 1.0) ** 2
    fg *= f[None, :, None]
