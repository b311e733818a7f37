"""Captions of the synthetic benchmark: a writer with several annotator styles.

A caption mentions only slots (hair, headwear, eyewear, upper, lower, shoes, bag, held) that are
visible in its image -- at least three -- in words drawn from synonym lists, in an order and sentence
form the annotator's style prefers, with filler words and occasional typos. The more slots and details
a caption mentions, the longer it is, so caption informativeness varies the way the Sew paper's
adaptive margin (its Eq. (10)) assumes. Presets mix different styles, which (with their cameras) makes
a domain gap between them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from tbps_lib.data.synthetic_attributes import SLOTS

# Synonyms per attribute value; the first entry is the most common wording.
NOUNS: dict[str, dict[str, tuple[str, ...]]] = {
    "upper": {"t-shirt": ("t-shirt", "tee", "tshirt"), "shirt": ("shirt", "button-up shirt", "blouse"),
              "jacket": ("jacket", "zip jacket"), "coat": ("coat", "overcoat", "trench coat"),
              "hoodie": ("hoodie", "hooded sweatshirt"), "sweater": ("sweater", "jumper", "pullover"),
              "dress": ("dress", "one-piece dress")},
    "lower": {"jeans": ("jeans", "denim pants"), "trousers": ("pants", "trousers", "slacks"),
              "shorts": ("shorts",), "skirt": ("skirt",), "leggings": ("leggings", "tights")},
    "shoes": {"sneakers": ("sneakers", "trainers", "sport shoes"), "boots": ("boots", "ankle boots"),
              "sandals": ("sandals",), "leather shoes": ("leather shoes", "formal shoes"),
              "heels": ("heels", "high heels")},
    "headwear": {"cap": ("cap", "baseball cap"), "beanie": ("beanie", "knit hat", "wool hat"),
                 "hat": ("hat", "sun hat", "brimmed hat")},
    "eyewear": {"glasses": ("glasses", "eyeglasses", "spectacles"), "sunglasses": ("sunglasses", "shades")},
    "bag": {"backpack": ("backpack", "rucksack", "knapsack"), "handbag": ("handbag", "purse"),
            "shoulder bag": ("shoulder bag", "messenger bag", "crossbody bag"),
            "suitcase": ("suitcase", "rolling suitcase", "luggage case")},
    "held": {"umbrella": ("umbrella",), "phone": ("phone", "cell phone", "mobile phone", "smartphone"),
             "cup": ("cup", "coffee cup", "paper cup")},
}
PLURAL = {"jeans", "trousers", "shorts", "leggings", "sneakers", "boots", "sandals", "leather shoes", "heels",
          "glasses", "sunglasses"}
COLOR_WORDS = {"grey": ("grey", "gray"), "purple": ("purple", "violet"), "beige": ("beige", "khaki", "tan")}
HAIR_COLOR_WORDS = {"blonde": ("blonde", "blond"), "grey": ("grey", "gray", "silver"), "red": ("red", "ginger")}
HAIR_LENGTH_WORDS = {"short": ("short",), "medium": ("shoulder-length", "medium-length", "medium"),
                     "long": ("long",)}
# Shape words that follow from the garment type (as real annotators add them).
CUT_WORDS = {"coat": ("long", "knee-length"), "dress": ("knee-length",), "skirt": ("knee-length", "flared"),
             "leggings": ("tight",), "trousers": ("long",), "sweater": ("knitted",)}
PATTERN_WORDS = {"striped": ("striped",), "plaid": ("plaid", "checked", "checkered"),
                 "dotted": ("polka-dot", "dotted", "spotted")}
SUBJECTS = {"male": ("man", "guy", "gentleman", "male"), "female": ("woman", "lady", "girl", "female")}
NEUTRAL_SUBJECTS = ("person", "pedestrian")
PRONOUNS = {"male": ("he", "his"), "female": ("she", "her"), None: ("the person", "their")}
# Words that name a slot; a caption containing one mentions that slot (used by the checks).
SLOT_WORDS: dict[str, frozenset[str]] = {
    "hair": frozenset({"hair", "ponytail", "bald"}),
    **{slot: frozenset(w.split()[-1] for syn in NOUNS[slot].values() for w in syn) for slot in NOUNS},
}
SALIENCE = {"upper": 5.0, "lower": 4.0, "bag": 3.0, "shoes": 2.5, "hair": 2.5, "headwear": 2.0,
            "eyewear": 1.5, "held": 1.5}
VERB_KIND = {"hair": "have", "headwear": "wear", "eyewear": "wear", "upper": "wear", "lower": "wear",
             "shoes": "wear", "bag": "carry", "held": "hold"}


@dataclass(frozen=True)
class Style:
    """An annotator: how many slots they mention, how much detail, how they phrase and how they err.

    ``coverage`` is the chance each visible slot beyond the first three is mentioned; ``detail`` the
    chance of each optional detail (pattern, sleeves, hair length, a bag's side, "a pair of");
    ``forms`` weights the sentence forms; ``filler`` the chance of each filler phrase; ``typo`` the
    per-word typo rate; ``synonym`` the chance of a less common synonym; ``order`` top_down, salient
    or random; ``casual`` writes in lower case without a final full stop; ``opener`` is the chance of
    an introductory phrase ("In this picture, ..."); ``scene`` the chance of saying where the person
    is (from the camera's scene: surroundings words, as real annotators sometimes add them).
    """

    name: str
    coverage: float
    detail: float
    forms: tuple[tuple[str, float], ...]
    filler: float
    typo: float
    synonym: float
    order: str
    neutral_subject: float = 0.1
    casual: bool = False
    opener: float = 0.0
    scene: float = 0.05


STYLES: dict[str, Style] = {s.name: s for s in (
    Style("plain", 0.55, 0.45, (("participle", 0.6), ("sentences", 0.4)), 0.2, 0.004, 0.25, "top_down"),
    Style("terse", 0.3, 0.25, (("participle", 0.7), ("list", 0.3)), 0.05, 0.004, 0.2, "salient", scene=0.0),
    Style("casual", 0.5, 0.35, (("participle", 0.5), ("sentences", 0.5)), 0.25, 0.02, 0.45, "random",
          casual=True),
    Style("narrative", 0.55, 0.45, (("sentences", 0.6), ("possessive", 0.4)), 0.3, 0.005, 0.3, "top_down",
          scene=0.1),
    Style("inventory", 0.95, 0.95, (("sentences", 0.7), ("participle", 0.3)), 0.6, 0.004, 0.35,
          "top_down", opener=0.3, scene=0.35),
    Style("thorough", 0.95, 0.85, (("possessive", 0.5), ("sentences", 0.5)), 0.7, 0.006, 0.4, "top_down",
          opener=0.3, scene=0.35),
    Style("observer", 0.45, 0.4, (("observer", 0.7), ("sentences", 0.3)), 0.5, 0.006, 0.35, "salient",
          scene=0.3),
    Style("storyteller", 0.5, 0.4, (("possessive", 0.4), ("observer", 0.3), ("sentences", 0.3)), 0.45, 0.01,
          0.5, "random", scene=0.3),
    Style("reporter", 0.5, 0.4, (("sentences", 0.5), ("possessive", 0.5)), 0.4, 0.008, 0.45, "salient",
          scene=0.45),
)}


def tokens(caption: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, inner hyphens/apostrophes), as in ``processed_tokens``."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", caption.lower())


def mentioned_slots(caption: str) -> set[str]:
    """The slots whose naming words occur in ``caption`` (typos may hide a mention, never invent one)."""
    words = set(tokens(caption))
    return {slot for slot, names in SLOT_WORDS.items() if words & names}


class _Writer:
    """Builds one caption; holds the random source, the style and the person's attributes."""

    def __init__(self, ident: dict[str, Any], style: Style, rng: np.random.Generator,
                 lexicon: Mapping[str, str] | None = None) -> None:
        self.a, self.s, self.rng, self.lexicon = ident, style, rng, lexicon or {}

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def word(self, options: tuple[str, ...]) -> str:
        """The usual wording (the dataset's ``lexicon`` may change it), or with probability ``synonym`` another."""
        if options[0] in self.lexicon:
            usual = self.lexicon[options[0]]
            options = (usual,) + tuple(o for o in options if o != usual)
        if len(options) == 1 or not self.chance(self.s.synonym):
            return options[0]
        return options[1 + int(self.rng.integers(len(options) - 1))]

    def color(self, key: str) -> str:
        name = self.a[key]
        return self.word(COLOR_WORDS.get(name, (name,)))

    def article(self, phrase: str) -> str:
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase

    # -- noun phrases per slot --------------------------------------------------------------------------
    def np_hair(self) -> str:
        if self.a["hair_length"] == "bald":
            return "a bald head"
        parts = []
        if self.chance(0.4 + 0.5 * self.s.detail):
            parts.append(self.word(HAIR_LENGTH_WORDS[self.a["hair_length"]]))
        if self.a["hair_style"] == "curly" and self.chance(self.s.detail + 0.2):
            parts.append("curly")
        parts.append(self.word(HAIR_COLOR_WORDS.get(self.a["hair_color"], (self.a["hair_color"],))))
        text = " ".join(parts) + " hair"
        if self.a["hair_style"] == "ponytail" and self.chance(self.s.detail + 0.2):
            text += self.word((" tied in a ponytail", " in a ponytail", " pulled back into a ponytail"))
        return text

    def np_garment(self, slot: str) -> str:
        kind = self.a[slot]
        noun = self.word(NOUNS[slot][kind])
        mods = [self.color(f"{slot}_color")]
        if kind in CUT_WORDS and self.chance(self.s.detail * 0.6):
            cut = self.word(CUT_WORDS[kind])
            if not noun.startswith(cut):  # no "tight tights"
                mods.append(cut)
        if slot == "upper":
            mods = self._upper_mods(mods)
        phrase = " ".join(mods + [noun])
        if kind == "hoodie" and self.chance(self.s.detail * 0.5):
            phrase += " with a hood"
        if kind in PLURAL:
            return ("a pair of " + phrase) if self.chance(0.2 + 0.5 * self.s.detail) else phrase
        return self.article(phrase)

    def _upper_mods(self, mods: list[str]) -> list[str]:
        pattern = self.a["upper_pattern"]
        if pattern != "solid" and self.chance(0.35 + 0.6 * self.s.detail):
            second = self.color("upper_pattern_color")
            mods = [f"{mods[0]} and {second}", self.word(PATTERN_WORDS[pattern])]
        if self.chance(self.s.detail * 0.8):
            mods.append(f"{self.a['sleeve']}-sleeved")
        return mods

    def np_simple(self, slot: str) -> str:
        kind = self.a[slot]
        noun = self.word(NOUNS[slot][kind])
        color_key = {"headwear": "headwear_color", "bag": "bag_color", "held": "held_color"}.get(slot)
        if color_key and self.a.get(color_key) and (slot != "held" or self.chance(0.5 + 0.5 * self.s.detail)):
            noun = self.color(color_key) + " " + noun
        if kind in PLURAL:
            return ("a pair of " + noun) if self.chance(0.3 + 0.4 * self.s.detail) else noun
        return self.article(noun)

    def phrase(self, slot: str) -> str:
        """The noun phrase of a slot, plus where a bag is carried when the style adds details."""
        if slot == "hair":
            return self.np_hair()
        if slot in ("upper", "lower", "shoes"):
            return self.np_garment(slot)
        text = self.np_simple(slot)
        if slot == "bag" and self.chance(self.s.detail):
            pos = PRONOUNS[self.a["gender"]][1]
            side = self.a["bag_side"]
            where = {"backpack": f" on {pos} back", "handbag": f" in {pos} {side} hand",
                     "shoulder bag": f" over {pos} {side} shoulder", "suitcase": " behind " + ("him" if
                     self.a["gender"] == "male" else "her")}
            text += where[self.a["bag"]]
        return text


def _choose_slots(w: _Writer, visible: list[str]) -> list[str]:
    """At least three visible slots (all if fewer), more with the style's coverage, weighted by salience."""
    cand = [s for s in SLOTS if s in visible]
    if len(cand) <= 3:
        n = len(cand)
    else:
        n = 3 + int(w.rng.binomial(len(cand) - 3, w.s.coverage))
    weights = np.array([SALIENCE[s] for s in cand])
    picked = w.rng.choice(len(cand), size=n, replace=False, p=weights / weights.sum())
    chosen = [cand[int(i)] for i in picked]
    if w.s.order == "top_down":
        return [s for s in SLOTS if s in chosen]
    if w.s.order == "salient":
        return sorted(chosen, key=lambda s: -SALIENCE[s] * w.rng.uniform(0.6, 1.4))
    return [chosen[int(i)] for i in w.rng.permutation(len(chosen))]


def _join(items: list[str], rng: np.random.Generator) -> str:
    if len(items) == 1:
        return items[0]
    comma = "," if rng.random() < 0.3 and len(items) > 2 else ""
    return ", ".join(items[:-1]) + f"{comma} and " + items[-1]


def _groups(slots: list[str]) -> list[tuple[str, list[str]]]:
    """Consecutive slots with the same verb kind, e.g. [(wear, [upper, lower]), (carry, [bag])]."""
    out: list[tuple[str, list[str]]] = []
    for s in slots:
        kind = VERB_KIND[s]
        if out and out[-1][0] == kind:
            out[-1][1].append(s)
        else:
            out.append((kind, [s]))
    return out


PARTICIPLE = {"wear": ("wearing", "in", "dressed in"), "have": ("with",), "carry": ("carrying", "with"),
              "hold": ("holding",)}
FINITE = {"wear": ("is wearing", "wears", "has on", "is dressed in"), "have": ("has",),
          "carry": ("is carrying", "carries", "has"), "hold": ("is holding", "holds")}


def _subject(w: _Writer) -> tuple[str, str | None]:
    """Subject noun phrase (``a woman``, ``the person``) and the gender its pronouns follow."""
    det = w.word(("a", "the", "this"))
    if w.chance(w.s.neutral_subject):
        return f"{det} {w.word(NEUTRAL_SUBJECTS)}", None
    return f"{det} {w.word(SUBJECTS[w.a['gender']])}", w.a["gender"]


def _verb(w: _Writer, table: dict[str, tuple[str, ...]], kind: str, slots: list[str]) -> str:
    """A verb for the group; "dressed in" / "in" only before clothes."""
    verb = w.word(table[kind])
    if verb.endswith("in") and slots[0] not in ("upper", "lower"):
        verb = table[kind][0]
    return verb


def _sentences_form(w: _Writer, groups, subject: str, gender) -> list[str]:
    pron = PRONOUNS[gender][0]
    out = []
    for i, (kind, slots) in enumerate(groups):
        subj = subject if i == 0 else pron
        verb = _verb(w, FINITE, kind, slots)
        also = " also" if i > 0 and w.chance(w.s.filler) and verb.startswith("is ") else ""
        if also:
            verb = "is also " + verb[3:]
        out.append(f"{subj} {verb} {_join([w.phrase(s) for s in slots], w.rng)}")
    return _merge(w, out)


def _participle_form(w: _Writer, groups, subject: str, gender) -> list[str]:
    head, *rest = groups
    intro = subject
    if head[0] == "have" and rest:
        intro += " with " + _join([w.phrase(s) for s in head[1]], w.rng)
        head, rest = rest[0], rest[1:]
    clauses = [f"{_verb(w, PARTICIPLE, head[0], head[1])} {_join([w.phrase(s) for s in head[1]], w.rng)}"]
    if w.chance(w.s.filler):
        clauses[0] = w.word(("who is ", "that is ", "walking and ", "")) + clauses[0]
    first = f"{intro} {clauses[0]}"
    pron = PRONOUNS[gender][0]
    tail = []
    for kind, slots in rest:
        np_ = _join([w.phrase(s) for s in slots], w.rng)
        if w.chance(0.5):
            first += f", {_verb(w, PARTICIPLE, kind, slots)} {np_}"
        else:
            tail.append(f"{pron} {_verb(w, FINITE, kind, slots)} {np_}")
    return [first] + _merge(w, tail)


def _possessive_form(w: _Writer, groups, subject: str, gender) -> list[str]:
    """One short statement per slot: "His jacket is black. His shoes are white." (garments only)."""
    pron, pos = PRONOUNS[gender]
    slots = [s for _, ss in groups for s in ss]
    out, first = [], True
    for s in slots:
        kind = w.a.get(s)
        if s in ("upper", "lower", "shoes") and not first and w.chance(0.7):
            noun = w.word(NOUNS[s][kind]).split()[-1] if kind not in PLURAL else w.word(NOUNS[s][kind])
            be = "are" if kind in PLURAL else "is"
            out.append(f"{pos} {noun} {be} {w.color(s + '_color')}")
            continue
        subj = subject if first else pron
        out.append(f"{subj} {_verb(w, FINITE, VERB_KIND[s], [s])} {w.phrase(s)}")
        first = False
    return _merge(w, out)


def _observer_form(w: _Writer, groups, subject: str, gender) -> list[str]:
    where = w.word(("in the picture", "in the image", "in the photo", "in this image"))
    noun = subject.split()[-1]
    lead = w.word((f"the {noun} {where} is", f"{where} there is a {noun} who is",
                   f"the {noun} {where} appears to be"))
    kind, slots = groups[0]
    if kind == "have":
        lead, verb = f"the {noun} {where}", "has"
    else:
        verb = {"wear": "wearing", "carry": "carrying", "hold": "holding"}[kind]
    out = [f"{lead} {verb} {_join([w.phrase(s) for s in slots], w.rng)}"]
    return out + _sentences_form(w, groups[1:], PRONOUNS[gender][0], gender) if len(groups) > 1 else out


def _list_form(w: _Writer, groups, subject: str, gender) -> list[str]:
    items = [w.phrase(s) for _, ss in groups for s in ss]
    return [subject.split()[-1] + ", " + ", ".join(items)]


FORMS = {"sentences": _sentences_form, "participle": _participle_form, "possessive": _possessive_form,
         "observer": _observer_form, "list": _list_form}


def _merge(w: _Writer, sentences: list[str]) -> list[str]:
    """Join some neighbouring sentences with "and" so sentence counts vary."""
    out: list[str] = []
    for s in sentences:
        if out and w.chance(0.3):
            out[-1] += " and " + s
        else:
            out.append(s)
    return out


SCENE_WORDS = {
    "street": ("on the street", "along the road", "on the sidewalk"),
    "campus": ("in front of a brick building", "on campus", "next to a brick wall"),
    "park": ("in a park", "on a path in the park", "near some trees"),
    "parking": ("in a parking lot", "next to parked cars"),
    "mall": ("in a shopping mall", "inside a mall", "past some shops"),
    "corridor": ("in a corridor", "in a hallway", "along an indoor hallway"),
    "station": ("in a station", "on a platform", "in a station hall"),
}


def _fillers(w: _Writer, sentences: list[str], gender, scene: str | None, force: bool = False) -> list[str]:
    """Padding that names no attribute of the person: walking, and where (the camera's scene)."""
    pron = PRONOUNS[gender][0]
    if scene is not None and (force or w.chance(w.s.scene)):
        where = w.word(SCENE_WORDS[scene])
        sentences.append(w.word((f"{pron} is walking {where}", f"{pron} is standing {where}",
                                 f"{pron} appears to be walking {where}")))
    elif force or w.chance(w.s.filler * 0.5):
        sentences.append(w.word((f"{pron} is walking", f"{pron} seems to be walking somewhere",
                                 f"{pron} is walking forward", f"{pron} appears to be in a hurry")))
    return sentences


def _typo(word: str, rng: np.random.Generator) -> str:
    """A plausible slip: swap two inner letters, drop one, or double one."""
    i = int(rng.integers(1, len(word) - 2))
    op = int(rng.integers(3))
    if op == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


OPENERS = ("in this picture, ", "in the image, ", "from the picture we can see that ", "as we can see, ")


def _finish(w: _Writer, sentences: list[str], typos: bool = True) -> str:
    if typos and w.s.opener and w.chance(w.s.opener):
        sentences = [w.word(OPENERS) + sentences[0]] + sentences[1:]
    text = ". ".join(s[0].upper() + s[1:] for s in sentences if s)
    if not w.s.casual:
        text += "."
    words = text.split(" ")
    for i, word in enumerate(words):
        if typos and len(word) >= 5 and word.isalpha() and w.chance(w.s.typo):
            words[i] = _typo(word, w.rng)
    text = " ".join(words)
    return text.lower() if w.s.casual else text


def write_caption(ident: dict[str, Any], visible: list[str], style: Style, rng: np.random.Generator,
                  scene: str | None = None, min_words: int = 0,
                  lexicon: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """One caption of an image of ``ident`` in ``style``; returns (caption, slots mentioned).

    ``lexicon`` maps a usual word to the one this dataset's annotators prefer ("pants" -> "trousers"),
    part of the vocabulary shift between presets. ``scene`` (the camera's scene) lets the annotator
    say where the person is; ``min_words`` makes a
    too-short caption be rewritten, each time a little more thoroughly, then padded with where the
    person is (RSTPReid's rule: at least 23 words per caption).
    """
    absent = [s for s in visible if s in SLOTS and s != "hair" and ident.get(s) in (None, "none")]
    if absent:
        raise ValueError(f"slots {absent} are marked visible but the person has none (attributes: "
                         f"{ {s: ident.get(s) for s in absent} })")
    w = _Writer(ident, style, rng, lexicon)
    for _ in range(4):
        slots = _choose_slots(w, visible)
        if not slots:
            raise ValueError(f"no visible slot to describe (visible={visible})")
        subject, gender = _subject(w)
        form = w.s.forms[int(rng.choice(len(w.s.forms), p=_norm([p for _, p in w.s.forms])))][0]
        sentences = _fillers(w, FORMS[form](w, _groups(slots), subject, gender), gender, scene)
        text = _finish(w, sentences)
        if len(text.split()) >= min_words:
            return text, slots
        w.s = replace(w.s, coverage=min(1.0, w.s.coverage + 0.15), detail=min(1.0, w.s.detail + 0.1))
    while len(text.split()) < min_words:  # still short: the annotator pads with where and how
        sentences = _fillers(w, sentences, gender, scene, force=True)
        text = _finish(w, sentences, typos=False)
    return text, slots


def _norm(p: list[float]) -> np.ndarray:
    a = np.asarray(p, dtype=float)
    return a / a.sum()


def pick_styles(mix: dict[str, float], n: int, rng: np.random.Generator) -> list[Style]:
    """``n`` different annotators for one image, drawn from a preset's style mix."""
    names = list(mix)
    if n > len(names):
        raise ValueError(f"{n} captions per image need at least {n} styles in the mix, got {names}")
    idx = rng.choice(len(names), size=n, replace=False, p=_norm([mix[k] for k in names]))
    return [STYLES[names[int(i)]] for i in idx]
