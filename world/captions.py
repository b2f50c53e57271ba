"""Captions of scenes: clean phrasings, web-style phrasings, and a parser that inverts both.

The clean phrasings use a small closed word set (VOCABULARY, 30 words) so that the world's small
models can use a compact token set. Web phrasings say the same thing the way alt-texts do: with
prefixes, suffixes, odd casing and synonyms that the clean vocabulary never uses.
"""

from __future__ import annotations

import re

import numpy as np

from capfilt.world.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, SceneObject

# One template list per object count; {L}/{R} are the left/right objects, {A} the only one.
_TEMPLATES = {
    2: (
        "{L} left of {R} on a {bg} background",
        "{R} to the right of {L}, {bg} background",
        "{bg} background with {L} on the left and {R} on the right",
        "there is {L} and {R} to its right, the background is {bg}",
        "a photo of {L} and {R} from left to right on a {bg} background",
    ),
    1: (
        "{A} on a {bg} background",
        "{A}, {bg} background",
        "{bg} background with {A}",
        "there is {A}, the background is {bg}",
        "a photo of {A} on a {bg} background",
    ),
}
N_PHRASINGS = len(_TEMPLATES[1])
_OBJECT_PHRASE = "a {size} {colour} {shape}"

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", " ".join(_TEMPLATES[1] + _TEMPLATES[2]))))
        | {"a"}
        | set(COLOURS + SHAPES + SIZES + BACKGROUNDS)
    )
)

# Web-only words: none of them is in VOCABULARY (a test pins that down).
SYNONYMS = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "navy"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "lilac"),
    "orange": ("tangerine", "amber"),
    "circle": ("ball", "disc", "dot"),
    "square": ("box", "block"),
    "triangle": ("wedge",),
    "cross": ("plus",),
    "small": ("tiny", "little"),
    "large": ("big", "huge"),
    "white": ("snowy",),
    "gray": ("grey",),
    "black": ("dark",),
}
WEB_PREFIXES = ("stock photo of", "image:", "picture of", "photo:", "clipart:", "vector illustration of")
WEB_SUFFIXES = ("| hd wallpaper", "- free download", "- stock image", "(royalty free)", "#shapes")


def _fill(template: str, scene: Scene, word) -> str:
    """Expand a template; word(w) maps each attribute word (identity for clean phrasings)."""

    def phrase(obj: SceneObject) -> str:
        return _OBJECT_PHRASE.format(size=word(obj.size), colour=word(obj.colour), shape=word(obj.shape))

    objects = scene.objects
    if len(objects) == 1:
        return template.format(A=phrase(objects[0]), bg=word(scene.background))
    return template.format(L=phrase(objects[0]), R=phrase(objects[1]), bg=word(scene.background))


def describe(scene: Scene, phrasing: int) -> str:
    """Clean caption number `phrasing` (0 <= phrasing < N_PHRASINGS) of the scene."""
    return _fill(_TEMPLATES[len(scene.objects)][phrasing], scene, lambda w: w)


def web_phrasing(scene: Scene, rng: np.random.Generator) -> str:
    """A correct caption in web style. It always carries a prefix or a suffix, so it never equals
    a clean phrasing; attribute words are swapped for synonyms half of the time."""

    def word(w: str) -> str:
        return SYNONYMS[w][int(rng.integers(len(SYNONYMS[w])))] if rng.random() < 0.5 else w

    template = _TEMPLATES[len(scene.objects)][int(rng.integers(N_PHRASINGS))]
    text = _fill(template, scene, word)
    use_prefix, use_suffix = rng.random() < 0.6, rng.random() < 0.6
    if not (use_prefix or use_suffix):
        use_prefix = True
    if use_prefix:
        text = f"{WEB_PREFIXES[int(rng.integers(len(WEB_PREFIXES)))]} {text}"
    if use_suffix:
        text = f"{text} {WEB_SUFFIXES[int(rng.integers(len(WEB_SUFFIXES)))]}"
    casing = rng.random()
    if casing < 0.2:
        text = text.title()
    elif casing < 0.3:
        text = text.capitalize()
    return text


# Parsing works on a normal form: lower case, punctuation dropped, synonyms mapped to the clean
# word. Templates, prefixes and suffixes go through the same normal form, then one anchored regex
# per template (with optional prefix/suffix) decides.
_CANONICAL = {synonym: word for word, synonyms in SYNONYMS.items() for synonym in synonyms}


def _normal_form(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(_CANONICAL.get(w, w) for w in words)


def _alternation(options) -> str:
    return "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))


def _object_pattern(name: str) -> str:
    return (
        f"a (?P<{name}_size>{_alternation(SIZES)}) (?P<{name}_colour>{_alternation(COLOURS)})"
        f" (?P<{name}_shape>{_alternation(SHAPES)})"
    )


def _template_regex(template: str) -> re.Pattern:
    slots = {"L": _object_pattern("L"), "R": _object_pattern("R"), "A": _object_pattern("A"),
             "bg": f"(?P<bg>{_alternation(BACKGROUNDS)})"}
    parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
    pieces = [slots[part] if i % 2 else re.escape(_normal_form(part)) for i, part in enumerate(parts)]
    body = " ".join(piece for piece in pieces if piece)
    prefix = _alternation(_normal_form(p) for p in WEB_PREFIXES)
    suffix = _alternation(_normal_form(s) for s in WEB_SUFFIXES)
    return re.compile(f"^(?:(?:{prefix}) )?{body}(?: (?:{suffix}))?$")


_PARSERS = [(count, _template_regex(t)) for count in (2, 1) for t in _TEMPLATES[count]]


def parse(text: str) -> Scene | None:
    """The scene a caption describes (any clean or web phrasing), or None if it describes none."""
    if not isinstance(text, str):
        return None
    normal = _normal_form(text)
    for count, regex in _PARSERS:
        match = regex.match(normal)
        if match is None:
            continue
        g = match.groupdict()
        names = ("A",) if count == 1 else ("L", "R")
        objects = tuple(SceneObject(g[f"{n}_colour"], g[f"{n}_shape"], g[f"{n}_size"]) for n in names)
        return Scene(objects, g["bg"])
    return None
