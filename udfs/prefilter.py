"""Rules on LAION-style metadata and captions, applied before download: pure pandas/numpy, free of Spark.

    RULES                                  every rule, in the order they are tried: setting, reason, roles, help
    resolve_column(name, present)          the column that holds `name`: itself, else input_<name>, else None
    active_rules(settings, present, cols)  (active, skipped): rules that are on and have their columns, and
                                           why each rule that is on cannot run ("column punsafe is absent")
    prefilter_frame(frame, settings, act)  (reason, detail) per row: the first failing rule, or None

A rule whose setting is off (None, 0 for the integer limits, an empty list) is neither active nor skipped.
The settings object is read with getattr (pipelines/config.py: PrefilterSettings).

What each rule means for odd values:
- Metadata (punsafe, pwatermark, similarity, width, height): a null, NaN, or non-numeric value never
  drops a row; a numeric string ("0.93", from CSV input) counts as its number. A width or height of 0 or
  less is taken for unknown, like a null (an image has none; a dump that writes 0 means "not measured").
- Caption lengths: code points after strip; words are whitespace-separated tokens, except that Chinese
  and Japanese (Han, kana), written without spaces, count one word per two characters of each run:
  measured on the parallel captions of tests/data/captions_languages.jsonl, a Chinese caption has 1.42
  characters and a Japanese one 2.09 per word of its English original, so one setting means about the
  same length in every script (other languages: 0.7-1.1 words per English word). CJK punctuation is not a
  word. Thai, Lao, Khmer and Burmese, also unspaced, count per whitespace token. A null caption is
  empty: 0 characters, 0 words.
- Language (udfs/language.py): a row leaves only when the detector is confident it is in a language not
  allowed: top language not in `languages` and score >= min_language_score. A short caption the detector
  cannot place (score below the bar) stays, as does one with no language (a file name, a product code):
  a pre-download rule should not throw away data on a guess; the CLIP filter after download still
  judges the pair.
- Blocklist: entries match whole words, after NFKC and case folding of both sides ("Ass" leaves "ass
  hat" but not "class"; fullwidth "ｆｏｏ" is "foo"); a phrase's spaces match any whitespace. A word
  boundary is any character that is not a letter, digit, underscore or combining mark (so a Devanagari
  vowel sign continues a word). Chinese and Japanese entries match anywhere: those scripts write no
  spaces between words. Patterns are regular expressions in RE2's syntax (Python's, less backreferences
  and lookaround), case-insensitive, searched in the NFKC form of the caption in linear time; as in RE2,
  \\w, \\d, \\s and \\b are ASCII (\\pL is any letter). Blank entries are ignored.
"""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

CAPTION = "caption"  # the caption's column in the pairs contract
DEFAULT_COLUMNS = {"punsafe": "punsafe", "pwatermark": "pwatermark", "similarity": "similarity",
                   "width": "WIDTH", "height": "HEIGHT"}
INPUT_PREFIX = "input_"  # pipelines/inputs.py renames an input column that clashes with ours to input_<name>


@dataclass(frozen=True)
class Rule:
    name: str                  # the setting that turns it on
    reason: str                # the reject reason
    roles: tuple[str, ...]     # column roles it reads: keys of settings.columns, or "caption"
    help: str
    zero_is_off: bool = False  # integer limits: 0 = off (otherwise only None or an empty list is off)


RULES: tuple[Rule, ...] = (
    Rule("max_punsafe", "punsafe", ("punsafe",), "NSFW probability above the limit"),
    Rule("max_pwatermark", "pwatermark", ("pwatermark",), "watermark probability above the limit"),
    Rule("min_similarity", "low_similarity", ("similarity",), "the dump's image-text similarity below the limit"),
    Rule("min_width", "image_too_small", ("width",), "original width below the limit", True),
    Rule("min_height", "image_too_small", ("height",), "original height below the limit", True),
    Rule("max_aspect_ratio", "aspect_ratio", ("width", "height"), "long side / short side above the limit"),
    Rule("min_caption_chars", "caption_too_short", (CAPTION,), "fewer characters than the limit", True),
    Rule("max_caption_chars", "caption_too_long", (CAPTION,), "more characters than the limit", True),
    Rule("min_caption_words", "caption_too_short", (CAPTION,), "fewer words than the limit", True),
    Rule("max_caption_words", "caption_too_long", (CAPTION,), "more words than the limit", True),
    Rule("blocklist", "blocklist", (CAPTION,), "a blocked word or phrase in the caption"),
    Rule("blocklist_patterns", "blocklist", (CAPTION,), "a blocked regular expression matches the caption"),
    # Last: the only costly rule, so it runs on the rows every other rule kept.
    Rule("languages", "language", (CAPTION,), "the caption is confidently in a language not allowed"),
)
RULES_BY_NAME = {r.name: r for r in RULES}
REASONS: tuple[str, ...] = tuple(dict.fromkeys(r.reason for r in RULES))
_ORDER = {r.name: i for i, r in enumerate(RULES)}


@dataclass(frozen=True)
class ActiveRule:
    """A rule that will run, with the frame column of each of its roles."""
    rule: Rule
    columns: tuple[tuple[str, str], ...]  # (role, column)

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def reason(self) -> str:
        return self.rule.reason

    def column(self, role: str) -> str:
        return dict(self.columns)[role]


def is_on(rule: Rule, value) -> bool:
    """Whether a setting's value turns its rule on."""
    if value is None:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(isinstance(v, str) and v.strip() for v in value)
    if rule.zero_is_off:
        return value != 0
    return True


def resolve_column(name: str | None, present) -> str | None:
    """The column holding `name`: the exact name, else input_<name> (the input reader's rename of a
    column that clashes with the pipeline's own, e.g. LAION's WIDTH next to our width), else None."""
    if not name:
        return None
    if name in present:
        return name
    if INPUT_PREFIX + name in present:
        return INPUT_PREFIX + name
    return None


def active_rules(settings, columns_present, columns_map=None) -> tuple[list[ActiveRule], dict[str, str]]:
    """(active rules in RULES order, {rule name: why it is skipped}) for the rules whose setting is on.

    columns_map: role -> input column name (settings.columns when None); a role it leaves out takes
    LAION's name (DEFAULT_COLUMNS). Patterns are compiled here, so a bad one fails on the driver, naming
    itself, before any task runs."""
    present = set(columns_present)
    if columns_map is None:
        columns_map = getattr(settings, "columns", None) or {}
    active, skipped = [], {}
    for rule in RULES:
        value = getattr(settings, rule.name, None)
        if not is_on(rule, value):
            continue
        if rule.name == "blocklist":
            _blocklist_regex(_entries(value))
        elif rule.name == "blocklist_patterns":
            _patterns(_entries(value))
        bound, missing = [], []
        for role in rule.roles:
            name = CAPTION if role == CAPTION else columns_map.get(role, DEFAULT_COLUMNS.get(role))
            column = resolve_column(name, present)
            if column is not None:
                bound.append((role, column))
            elif not name:
                missing.append(f"no column is set for {role} (prefilter.columns.{role})")
            else:
                missing.append(f"column {name} is absent" + ("" if role == CAPTION else f" (nor {INPUT_PREFIX}{name})"))
        if missing:
            skipped[rule.name] = "; ".join(missing)
        else:
            active.append(ActiveRule(rule, tuple(bound)))
    return active, skipped


# ---------------------------------------------------------------------------------------------------
# Captions: lengths

_CJK = ("\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
        "\U00020000-\U0002fa1f")
_CJK_PUNCT = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
# A word: two CJK characters (or one at the end of a run), or a run of anything else but whitespace.
_WORDS = re.compile(f"[{_CJK}]{{1,2}}|[^\\s{_CJK}{_CJK_PUNCT}]+")


def caption_words(text: str | None) -> int:
    """Words in a caption, as the length rules count them (see the module docstring)."""
    return len(_WORDS.findall(text)) if isinstance(text, str) else 0


def caption_chars(text: str | None) -> int:
    """Code points after strip, as the length rules count them."""
    return len(text.strip()) if isinstance(text, str) else 0


# ---------------------------------------------------------------------------------------------------
# Captions: blocklist

def _entries(values) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if isinstance(v, str) and v.strip()))


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


_SPACE = re.compile(r"\s+")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@functools.lru_cache(maxsize=1)
def _word_class() -> str:
    """A regex class of word characters: \\w and every combining mark (which \\w leaves out: a vowel
    sign inside a Devanagari word would otherwise be a word boundary)."""
    marks, start, prev = [], None, None
    for cp in [*range(0x300, 0x30000), *range(0xE0100, 0xE01F0)]:
        if unicodedata.category(chr(cp)).startswith("M"):
            if start is None or cp != prev + 1:
                if start is not None:
                    marks.append((start, prev))
                start = cp
            prev = cp
    marks.append((start, prev))
    return "[\\w" + "".join(f"{chr(a)}-{chr(b)}" if a != b else chr(a) for a, b in marks) + "]"


def _bounded(ch: str) -> bool:
    """Whether a blocklist entry starting or ending with `ch` needs a word boundary there."""
    return bool(re.match(r"\w", ch)) and not re.match(f"[{_CJK}]", ch)


def _trie_pattern(node: dict) -> str:
    """The regex of a trie of folded entries ('' marks an entry's end, ' ' is any whitespace): at each
    character the longer entries are tried first, and the regex backtracks to the shorter ones."""
    alternatives = []
    for ch in sorted(c for c in node if c):
        piece = r"\s+" if ch == " " else re.escape(ch)
        alternatives.append(piece + _trie_pattern(node[ch]))
    if "" in node and alternatives:
        alternatives.append("")
    if len(alternatives) <= 1:
        return alternatives[0] if alternatives else ""
    return "(?:" + "|".join(alternatives) + ")"


@functools.lru_cache(maxsize=16)
def _blocklist_regex(entries: tuple[str, ...]) -> tuple[re.Pattern, dict[str, str]]:
    """One regex for all entries and the map from a folded match back to the entry as configured.
    The entries form tries (thousands of words cost little more than one), one per kind of edge (a
    word-boundary assertion before, after, both or neither), so the word class appears at most 4 times."""
    word = _word_class()
    keys: dict[str, str] = {}
    for entry in entries:
        keys.setdefault(_SPACE.sub(" ", _fold(entry)).strip(), entry)
    tries: dict[tuple[bool, bool], dict] = {}
    for key in keys:
        node = tries.setdefault((_bounded(key[0]), _bounded(key[-1])), {})
        for ch in key:
            node = node.setdefault(ch, {})
        node[""] = {}
    parts = [("(?<!%s)" % word if lead else "") + "(?:" + _trie_pattern(trie) + ")" + ("(?!%s)" % word if tail else "")
             for (lead, tail), trie in sorted(tries.items())]
    return re.compile("|".join(parts)), keys


@functools.lru_cache(maxsize=16)
def _patterns(entries: tuple[str, ...]) -> tuple[tuple[str, object], ...]:
    """Each pattern compiled by RE2, which matches in time linear in the caption: Python's `re` backtracks,
    and one pattern such as (a+)+$ held a worker for seconds per caption (minutes at 40 characters)."""
    import re2
    options = re2.Options()
    options.case_sensitive = False
    options.never_capture = True   # only whether it matches is used
    options.log_errors = False     # the error is raised (below), not also printed by RE2's logger
    compiled = []
    for pattern in entries:
        try:
            compiled.append((pattern, re2.compile(pattern, options)))
        except re2.error as e:
            why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            try:
                re.compile(pattern)
            except re.error as python_error:
                raise ValueError(f"prefilter.blocklist_patterns: {pattern!r} is not a regular expression: "
                                 f"{python_error}") from None
            raise ValueError(f"prefilter.blocklist_patterns: {pattern!r} needs a backtracking regex engine ({why}); "
                             f"patterns are matched by RE2 in linear time, without backreferences or lookaround "
                             f"(docs/filters.md)") from None
    return tuple(compiled)


def blocklist_matcher(entries):
    """A function: caption -> the blocklist entry (as configured) it contains first, or None."""
    regex, keys = _blocklist_regex(_entries(entries))

    def match(text: str | None) -> str | None:
        if not isinstance(text, str):
            return None
        m = regex.search(_fold(text))
        return keys[_SPACE.sub(" ", m.group())] if m else None
    return match


def blocklist_match(text: str | None, entries) -> str | None:
    """The blocklist entry (as configured) that a caption contains first, or None."""
    return blocklist_matcher(entries)(text)


# ---------------------------------------------------------------------------------------------------
# The frame

def numeric(values: pd.Series) -> np.ndarray:
    """float64 values: NaN for null, and for anything that is neither a number nor a numeric string
    (a word, bytes, a list, a boolean)."""
    dtype = values.dtype
    if is_numeric_dtype(dtype) and not is_bool_dtype(dtype):
        return values.to_numpy(dtype="float64", na_value=np.nan)
    return np.array([_number(v) for v in values.tolist()], dtype="float64")  # object/string: CSV-like input


def _number(v) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, str, np.number)):
        return math.nan
    try:
        return float(v)
    except (ValueError, OverflowError):
        return math.nan


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


class _Frame:
    """The columns of one pandas batch, each computed once and only when a rule asks."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self._numbers: dict[str, np.ndarray] = {}
        self._captions: dict[str, list] = {}

    def numbers(self, column: str) -> np.ndarray:
        if column not in self._numbers:
            self._numbers[column] = numeric(self.frame[column])
        return self._numbers[column]

    def size(self, column: str) -> np.ndarray:
        """A width or height: NaN where null or not positive (unknown)."""
        v = self.numbers(column)
        with np.errstate(invalid="ignore"):
            return np.where(v > 0, v, np.nan)

    def captions(self, column: str) -> list:
        """The column's values, None for whatever is not a string (null, NaN, bytes, a number)."""
        if column not in self._captions:
            self._captions[column] = [c if isinstance(c, str) else None for c in self.frame[column].tolist()]
        return self._captions[column]

    def measure(self, column: str, measure) -> np.ndarray:
        """measure(caption) of every row, once per measure (the min and max rules share it)."""
        key = f"{measure.__name__}:{column}"
        if key not in self._numbers:
            self._numbers[key] = np.array([measure(c) for c in self.captions(column)], dtype=np.int64)
        return self._numbers[key]


def _compare(values: np.ndarray, limit: float, above: bool) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return values > limit if above else values < limit


def prefilter_frame(frame: pd.DataFrame, settings, active) -> tuple[pd.Series, pd.Series]:
    """(reason, detail): per row, the first failing rule of `active` in RULES order, and its value
    against its limit ("punsafe 0.93 > 0.5"); None and None for a row every rule keeps. A null or
    non-numeric metadata value fails no rule (see the module docstring)."""
    n = len(frame)
    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)
    left = np.ones(n, dtype=bool)  # rows no rule has dropped yet
    data = _Frame(frame)
    for bound in sorted(active, key=lambda a: _ORDER[a.rule.name]):
        if not left.any():
            break
        fails, describe = _CHECKS[bound.rule.name](data, bound, getattr(settings, bound.rule.name), settings, left)
        hit = np.asarray(fails, dtype=bool) & left
        rows = np.flatnonzero(hit)
        if len(rows):
            reason[rows] = bound.rule.reason
            detail[rows] = [describe(i) for i in rows]
            left &= ~hit
    return (pd.Series(reason, index=frame.index, dtype=object, name="reason"),
            pd.Series(detail, index=frame.index, dtype=object, name="detail"))


def _metadata(role: str, label: str, above: bool):
    def check(data, bound, limit, settings, left):
        values = data.numbers(bound.column(role))
        sign = ">" if above else "<"
        return _compare(values, float(limit), above), lambda i: f"{label} {_fmt(values[i])} {sign} {_fmt(limit)}"
    return check


def _side(role: str):
    def check(data, bound, limit, settings, left):
        values = data.size(bound.column(role))
        return _compare(values, float(limit), False), lambda i: f"{role} {_fmt(values[i])} < {_fmt(limit)}"
    return check


def _aspect(data, bound, limit, settings, left):
    w, h = data.size(bound.column("width")), data.size(bound.column("height"))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.maximum(w, h) / np.minimum(w, h)
    return (_compare(ratio, float(limit), True),
            lambda i: f"aspect ratio {ratio[i]:.3g} ({_fmt(w[i])}x{_fmt(h[i])}) > {_fmt(limit)}")


def _length(measure, unit: str, above: bool):
    def check(data, bound, limit, settings, left):
        counts = data.measure(bound.column(CAPTION), measure)
        sign = ">" if above else "<"
        fails = counts > limit if above else counts < limit
        return fails, lambda i: f"caption {counts[i]} {unit} {sign} {limit}"
    return check


def _found(found: np.ndarray) -> np.ndarray:
    return np.array([f is not None for f in found], dtype=bool)


def _blocklist(data, bound, limit, settings, left):
    match = blocklist_matcher(limit)
    captions = data.captions(bound.column(CAPTION))
    found = np.full(len(captions), None, dtype=object)
    for i in np.flatnonzero(left):
        found[i] = match(captions[i])
    return _found(found), lambda i: f'blocklist: "{found[i]}"'


def _blocklist_patterns(data, bound, limit, settings, left):
    compiled = _patterns(_entries(limit))
    captions = data.captions(bound.column(CAPTION))
    found = np.full(len(captions), None, dtype=object)
    for i in np.flatnonzero(left):
        if captions[i] is not None:
            text = unicodedata.normalize("NFKC", captions[i])
            if _LONE_SURROGATE.search(text):  # RE2 reads UTF-8, which has no lone surrogates
                text = _LONE_SURROGATE.sub("\ufffd", text)
            found[i] = next((p for p, rx in compiled if rx.search(text)), None)
    return _found(found), lambda i: f'blocklist pattern: "{found[i]}"'


def _languages(data, bound, limit, settings, left):
    from capfilt.udfs.language import detect_languages
    allowed = [c for c in (_language_code(x) for x in limit) if c]
    min_score = float(getattr(settings, "min_language_score", 0.0) or 0.0)
    captions = data.captions(bound.column(CAPTION))
    rows = np.flatnonzero(left)
    codes = np.full(len(captions), None, dtype=object)
    scores = np.zeros(len(captions))
    unique = list(dict.fromkeys(captions[i] for i in rows))  # dumps repeat captions ("image", product names)
    found = dict(zip(unique, detect_languages(unique)))
    for i in rows:
        codes[i], scores[i] = found[captions[i]]
    fails = np.array([c is not None and c not in allowed for c in codes]) & (scores >= min_score)
    shown = ", ".join(allowed)
    return fails, lambda i: f"language {codes[i]} ({scores[i]:.2f}) not in {shown}"


def _language_code(code) -> str | None:
    """'en', 'EN', 'en-US', 'zh_Hant' -> the ISO 639 code the detector gives."""
    if not isinstance(code, str) or not code.strip():
        return None
    return re.split(r"[-_]", code.strip().lower())[0]


_CHECKS = {
    "max_punsafe": _metadata("punsafe", "punsafe", True),
    "max_pwatermark": _metadata("pwatermark", "pwatermark", True),
    "min_similarity": _metadata("similarity", "similarity", False),
    "min_width": _side("width"),
    "min_height": _side("height"),
    "max_aspect_ratio": _aspect,
    "min_caption_chars": _length(caption_chars, "chars", False),
    "max_caption_chars": _length(caption_chars, "chars", True),
    "min_caption_words": _length(caption_words, "words", False),
    "max_caption_words": _length(caption_words, "words", True),
    "blocklist": _blocklist,
    "blocklist_patterns": _blocklist_patterns,
    "languages": _languages,
}
assert set(_CHECKS) == set(RULES_BY_NAME), "every rule has a check"
