"""Identities of the synthetic benchmark: the attribute vocabulary and how people are sampled.

An identity is a flat dict of named attributes (what captions talk about) plus an ``appearance`` dict
(what only the renderer uses: skin tone, height, build, the exact shade of each colour). Colours follow
a realistic skew (black, white, grey and blue are frequent), so many people share most attributes.

The ``difficulty`` knob (0..1) sets how close *neighbouring* identities are. Identities come in
families: a founder drawn from the prior, then siblings that copy the founder and re-draw a few
"change units" (upper colour, bag, shoes type, ...). Higher difficulty means larger families whose
members differ in fewer units, i.e. more "similar people" that differ in one or two details -- the
case the papers target. Difficulty 0 gives independent people (families of one).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# Named colours with a realistic frequency skew (weights sum to 1) and a base RGB.
COLORS: dict[str, tuple[tuple[int, int, int], float]] = {
    "black": ((30, 30, 32), 0.22),
    "white": ((236, 236, 232), 0.14),
    "grey": ((128, 128, 130), 0.13),
    "blue": ((38, 78, 178), 0.13),
    "red": ((192, 34, 38), 0.07),
    "brown": ((112, 70, 38), 0.06),
    "green": ((42, 128, 58), 0.05),
    "beige": ((206, 186, 144), 0.05),
    "pink": ((236, 138, 176), 0.04),
    "yellow": ((232, 202, 36), 0.04),
    "purple": ((118, 56, 150), 0.035),
    "orange": ((236, 124, 28), 0.035),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

HAIR_COLORS: dict[str, tuple[tuple[int, int, int], float]] = {
    "black": ((22, 18, 16), 0.50),
    "brown": ((92, 58, 32), 0.28),
    "blonde": ((214, 178, 102), 0.09),
    "grey": ((150, 148, 146), 0.08),
    "red": ((150, 56, 24), 0.05),
}
SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (244, 212, 186), (226, 184, 150), (198, 150, 112), (150, 104, 72), (104, 70, 48),
)

# Categorical attributes: value -> weight, per gender where it matters.
HAIR_LENGTH = {"male": {"short": 0.74, "medium": 0.15, "long": 0.04, "bald": 0.07},
               "female": {"short": 0.14, "medium": 0.36, "long": 0.50}}
HAIR_STYLE = {"straight": 0.62, "curly": 0.2, "ponytail": 0.18}  # ponytail needs medium or long hair
HEADWEAR = {"none": 0.7, "cap": 0.13, "beanie": 0.07, "hat": 0.1}
EYEWEAR = {"none": 0.7, "glasses": 0.22, "sunglasses": 0.08}
UPPER = {"male": {"t-shirt": 0.3, "shirt": 0.2, "jacket": 0.2, "coat": 0.1, "hoodie": 0.1, "sweater": 0.1},
         "female": {"t-shirt": 0.24, "shirt": 0.18, "jacket": 0.14, "coat": 0.1, "hoodie": 0.06,
                    "sweater": 0.1, "dress": 0.18}}
SHORT_SLEEVE_P = {"t-shirt": 0.88, "shirt": 0.4, "dress": 0.5}  # other garments are long-sleeved
PATTERN = {"solid": 0.68, "striped": 0.13, "plaid": 0.1, "dotted": 0.09}
LOWER = {"male": {"jeans": 0.4, "trousers": 0.4, "shorts": 0.2},
         "female": {"jeans": 0.3, "trousers": 0.2, "shorts": 0.14, "skirt": 0.22, "leggings": 0.14}}
SHOES = {"male": {"sneakers": 0.46, "boots": 0.16, "sandals": 0.08, "leather shoes": 0.3},
         "female": {"sneakers": 0.42, "boots": 0.18, "sandals": 0.12, "leather shoes": 0.1, "heels": 0.18}}
BAG = {"none": 0.34, "backpack": 0.3, "handbag": 0.12, "shoulder bag": 0.16, "suitcase": 0.08}
HELD = {"none": 0.74, "umbrella": 0.08, "phone": 0.11, "cup": 0.07}

# Colour skews that differ from the global one (multiplied into COLORS' weights).
COLOR_BIAS: dict[str, dict[str, float]] = {
    "jeans": {"blue": 5.0, "black": 1.6, "grey": 1.2, "white": 0.4},
    "shoes": {"black": 1.6, "white": 2.0, "grey": 1.0, "brown": 1.5},
    "bag": {"black": 2.0, "brown": 1.5},
    "dress": {"red": 1.6, "pink": 2.0, "blue": 1.2, "black": 1.0, "white": 1.2},
}

# Slots are what a caption can mention and what a part of the image shows.
SLOTS: tuple[str, ...] = ("hair", "headwear", "eyewear", "upper", "lower", "shoes", "bag", "held")

# Units a sibling may re-draw (each names the attribute keys it owns).
CHANGE_UNITS: dict[str, tuple[str, ...]] = {
    "hair_color": ("hair_color",),
    "hair_length": ("hair_length", "hair_style"),
    "headwear": ("headwear", "headwear_color"),
    "eyewear": ("eyewear",),
    "upper": ("upper", "sleeve"),
    "upper_color": ("upper_color",),
    "upper_pattern": ("upper_pattern", "upper_pattern_color"),
    "lower": ("lower",),
    "lower_color": ("lower_color",),
    "shoes": ("shoes",),
    "shoes_color": ("shoes_color",),
    "bag": ("bag", "bag_color", "bag_side"),
    "held": ("held", "held_color"),
}


def _pick(rng: np.random.Generator, weights: dict[str, float], exclude: str | None = None) -> str:
    """Draw a key of ``weights`` in proportion to its weight (optionally never ``exclude``)."""
    keys = [k for k in weights if k != exclude]
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _color(rng: np.random.Generator, bias: str | None = None, exclude: str | None = None) -> str:
    """A named colour from the skewed palette, with an optional garment-specific bias."""
    mult = COLOR_BIAS.get(bias or "", {})
    return _pick(rng, {c: w * mult.get(c, 1.0) for c, (_, w) in COLORS.items()}, exclude)


def _draw_unit(rng: np.random.Generator, ident: dict[str, Any], unit: str) -> None:
    """(Re-)draw the attributes of one change unit in place, respecting the others."""
    g = ident["gender"]
    if unit == "hair_color":
        ident["hair_color"] = None if ident["hair_length"] == "bald" else _pick(
            rng, {k: w for k, (_, w) in HAIR_COLORS.items()})
    elif unit == "hair_length":
        ident["hair_length"] = _pick(rng, HAIR_LENGTH[g])
        style = _pick(rng, HAIR_STYLE)
        if ident["hair_length"] == "bald":
            style = None
        elif style == "ponytail" and ident["hair_length"] == "short":
            style = "straight"
        ident["hair_style"] = style
        if ident["hair_length"] != "bald" and ident.get("hair_color") is None:
            _draw_unit(rng, ident, "hair_color")
        if ident["hair_length"] == "bald":
            ident["hair_color"] = None
    elif unit == "headwear":
        ident["headwear"] = _pick(rng, HEADWEAR)
        ident["headwear_color"] = None if ident["headwear"] == "none" else _color(rng)
    elif unit == "eyewear":
        ident["eyewear"] = _pick(rng, EYEWEAR)
    elif unit == "upper":
        ident["upper"] = _pick(rng, UPPER[g])
        p_short = SHORT_SLEEVE_P.get(ident["upper"], 0.0)
        ident["sleeve"] = "short" if rng.random() < p_short else "long"
        _fix_lower(rng, ident)
    elif unit == "upper_color":
        ident["upper_color"] = _color(rng, ident["upper"] if ident["upper"] == "dress" else None)
        _fix_pattern_color(rng, ident)
    elif unit == "upper_pattern":
        ident["upper_pattern"] = _pick(rng, PATTERN)
        ident["upper_pattern_color"] = None
        _fix_pattern_color(rng, ident)
    elif unit == "lower":
        if ident["upper"] != "dress":
            ident["lower"] = _pick(rng, LOWER[g])
            if ident.get("lower_color") is None:
                _draw_unit(rng, ident, "lower_color")
    elif unit == "lower_color":
        ident["lower_color"] = None if ident["lower"] is None else _color(rng, ident["lower"])
    elif unit == "shoes":
        ident["shoes"] = _pick(rng, SHOES[g])
    elif unit == "shoes_color":
        ident["shoes_color"] = _color(rng, "shoes")
    elif unit == "bag":
        ident["bag"] = _pick(rng, BAG)
        ident["bag_color"] = None if ident["bag"] == "none" else _color(rng, "bag")
        ident["bag_side"] = ("left", "right")[int(rng.integers(2))] if ident["bag"] not in (
            "none", "backpack") else None
    elif unit == "held":
        ident["held"] = _pick(rng, HELD)
        ident["held_color"] = _color(rng) if ident["held"] == "umbrella" else None
    else:
        raise ValueError(f"unknown change unit {unit!r}; known: {sorted(CHANGE_UNITS)}")


def _fix_lower(rng: np.random.Generator, ident: dict[str, Any]) -> None:
    """A dress has no lower garment; any other upper garment needs one."""
    if ident["upper"] == "dress":
        ident["lower"], ident["lower_color"] = None, None
    elif ident.get("lower") is None:
        ident["lower"] = _pick(rng, LOWER[ident["gender"]])
        ident["lower_color"] = _color(rng, ident["lower"])


def _fix_pattern_color(rng: np.random.Generator, ident: dict[str, Any]) -> None:
    """A patterned garment has a second colour different from its main colour."""
    if ident.get("upper_pattern", "solid") == "solid":
        ident["upper_pattern_color"] = None
    elif ident.get("upper_pattern_color") in (None, ident.get("upper_color")):
        main = ident.get("upper_color")
        ident["upper_pattern_color"] = "white" if main not in ("white", None) and rng.random() < 0.5 else \
            _color(rng, exclude=main)


def _appearance(rng: np.random.Generator, ident: dict[str, Any]) -> dict[str, Any]:
    """Traits no caption names but every image of the person shares: skin, height, build, shades."""
    rgb: dict[str, list[int]] = {}
    for key in ("hair_color", "headwear_color", "upper_color", "upper_pattern_color", "lower_color",
                "shoes_color", "bag_color", "held_color"):
        name = ident.get(key)
        if name is None:
            continue
        base = HAIR_COLORS[name][0] if key == "hair_color" else COLORS[name][0]
        shade = 1.0 + rng.uniform(-0.12, 0.12)
        tint = rng.uniform(-10, 10, size=3)
        rgb[key] = [int(np.clip(c * shade + t, 0, 255)) for c, t in zip(base, tint)]
    return {
        "skin": int(rng.integers(len(SKIN_TONES))),
        "height": round(float(rng.uniform(0.93, 1.04)), 3),
        "build": round(float(rng.uniform(0.9, 1.12)) * (1.04 if ident["gender"] == "male" else 0.96), 3),
        "rgb": rgb,
    }


def sample_person(rng: np.random.Generator) -> dict[str, Any]:
    """One identity drawn from the prior (attributes only; see :func:`with_appearance`)."""
    ident: dict[str, Any] = {"gender": ("male", "female")[int(rng.integers(2))], "hair_color": None}
    order = ("hair_length", "hair_color", "headwear", "eyewear", "upper", "upper_color", "upper_pattern",
             "lower", "lower_color", "shoes", "shoes_color", "bag", "held")
    for unit in order:
        _draw_unit(rng, ident, unit)
    return ident


def signature(ident: dict[str, Any]) -> tuple:
    """The captionable attributes as a hashable tuple (two identities may not share one)."""
    return tuple(sorted((k, v) for k, v in ident.items() if k != "appearance"))


def mutate(rng: np.random.Generator, founder: dict[str, Any], n_changes: int) -> dict[str, Any]:
    """A sibling of ``founder``: a copy with ``n_changes`` distinct change units re-drawn to new values."""
    units = list(CHANGE_UNITS)
    if founder["hair_length"] == "bald":
        units.remove("hair_color")
    if founder["upper"] == "dress":
        units = [u for u in units if u not in ("lower", "lower_color")]
    chosen = rng.choice(len(units), size=min(n_changes, len(units)), replace=False)
    child = {k: v for k, v in founder.items() if k != "appearance"}
    for i in sorted(int(c) for c in chosen):
        unit = units[i]
        before = tuple(child.get(k) for k in CHANGE_UNITS[unit])
        for _ in range(20):  # re-draw until the unit actually changes
            _draw_unit(rng, child, unit)
            if tuple(child.get(k) for k in CHANGE_UNITS[unit]) != before:
                break
    return child


def family_plan(rng: np.random.Generator, difficulty: float) -> tuple[int, int]:
    """Size of the next family and the mean number of units a sibling changes, for ``difficulty``.

    Family size is 1 + Poisson(8 d); a sibling changes 1 + Binomial(12, 0.45 (1 - d)) units, so at the
    default d = 0.5 families have about five members that differ from their founder in about four of
    the thirteen units, and at d = 1 every sibling differs in exactly one unit.
    """
    size = 1 + int(rng.poisson(8.0 * difficulty))
    changes = 1 + int(rng.binomial(12, 0.45 * (1.0 - difficulty)))
    return size, changes


def sample_identities(rng: np.random.Generator, n: int, difficulty: float,
                      taken: set[tuple] | None = None) -> list[dict[str, Any]]:
    """``n`` distinct identities in families whose closeness follows ``difficulty`` (0..1).

    ``taken`` holds signatures already used (e.g. by another split) and is updated in place, so no two
    identities of a dataset share all captionable attributes.
    """
    if not 0.0 <= difficulty <= 1.0 or math.isnan(difficulty):
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    taken = set() if taken is None else taken
    people: list[dict[str, Any]] = []
    while len(people) < n:
        size, _ = family_plan(rng, difficulty)
        founder = _unique(rng, taken, lambda: sample_person(rng))
        members = [founder]
        for _ in range(min(size, n - len(people)) - 1):
            _, changes = family_plan(rng, difficulty)
            members.append(_unique(rng, taken, lambda: mutate(rng, founder, changes)))
        people.extend(members)
    return [with_appearance(rng, p) for p in people[:n]]


def _unique(rng: np.random.Generator, taken: set[tuple], draw) -> dict[str, Any]:
    """Call ``draw`` until it returns an identity whose signature is not taken; record it."""
    for _ in range(1000):
        ident = draw()
        sig = signature(ident)
        if sig not in taken:
            taken.add(sig)
            return ident
    raise RuntimeError("could not draw a distinct identity in 1000 tries (difficulty too high for the size)")


def with_appearance(rng: np.random.Generator, ident: dict[str, Any]) -> dict[str, Any]:
    """Return ``ident`` with its renderer-only ``appearance`` traits drawn."""
    out = dict(ident)
    out["appearance"] = _appearance(rng, ident)
    return out


def color_rgb(name: str) -> tuple[int, int, int]:
    """Base RGB of a garment colour name (error names the known colours)."""
    if name not in COLORS:
        raise ValueError(f"unknown colour {name!r}; known: {list(COLORS)}")
    return COLORS[name][0]
