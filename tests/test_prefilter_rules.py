"""The prefilter's rules (udfs/prefilter.py) and the caption language detector (udfs/language.py), on
LAION-shaped pandas batches: no Spark (none starts), a few seconds."""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from capfilt.udfs import language
from capfilt.udfs.language import detect_languages
from capfilt.udfs.prefilter import (REASONS, RULES, active_rules, blocklist_match, caption_chars, caption_words,
                                    numeric, prefilter_frame, resolve_column)

CAPTIONS = Path(__file__).parent / "data" / "captions_languages.jsonl"
LAION_COLUMNS = {"punsafe": "punsafe", "pwatermark": "pwatermark", "similarity": "similarity",
                 "width": "WIDTH", "height": "HEIGHT"}


@dataclasses.dataclass
class Settings:
    """The attributes of pipelines/config.py's PrefilterSettings, every rule off."""
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_similarity: float | None = None
    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float | None = None
    min_caption_chars: int = 0
    max_caption_chars: int = 0
    min_caption_words: int = 0
    max_caption_words: int = 0
    languages: list = dataclasses.field(default_factory=list)
    min_language_score: float = 0.5
    blocklist: list = dataclasses.field(default_factory=list)
    blocklist_patterns: list = dataclasses.field(default_factory=list)
    columns: dict = dataclasses.field(default_factory=lambda: dict(LAION_COLUMNS))


def laion(rows: list[dict], renamed=True) -> pd.DataFrame:
    """A pairs batch as LAION-5B parquet gives it: punsafe/pwatermark/similarity float64 (NaN for
    null), WIDTH/HEIGHT int64, arriving as input_WIDTH/input_HEIGHT after the input reader's rename."""
    base = {"uid": "0", "url": "http://example.com/a.jpg", "caption": "A red bicycle leaning on a wall",
            "punsafe": 0.01, "pwatermark": 0.05, "similarity": 0.33, "WIDTH": 640, "HEIGHT": 480}
    frame = pd.DataFrame([{**base, "uid": str(i), **r} for i, r in enumerate(rows)])
    for col in ("punsafe", "pwatermark", "similarity"):
        if frame[col].map(lambda v: v is None or isinstance(v, float)).all():
            frame[col] = frame[col].astype("float64")
    if frame["WIDTH"].map(lambda v: isinstance(v, int)).all():
        frame["WIDTH"] = frame["WIDTH"].astype("int64")
    if renamed:
        frame = frame.rename(columns={"WIDTH": "input_WIDTH", "HEIGHT": "input_HEIGHT"})
    return frame


def run(frame: pd.DataFrame, **settings):
    s = Settings(**settings)
    active, skipped = active_rules(s, set(frame.columns), s.columns)
    assert not skipped, skipped
    reason, detail = prefilter_frame(frame, s, active)
    return list(reason), list(detail)


# --- the rule table -----------------------------------------------------------------------------

def test_rules_name_settings_in_order_with_language_last():
    names = [r.name for r in RULES]
    assert len(set(names)) == len(names)
    assert names[0] == "max_punsafe" and names[-1] == "languages"
    assert set(REASONS) == {"punsafe", "pwatermark", "low_similarity", "image_too_small", "aspect_ratio",
                            "caption_too_short", "caption_too_long", "blocklist", "language"}
    assert all(set(Settings.__dataclass_fields__) >= {r.name} for r in RULES)
    assert all(r.help and r.roles for r in RULES)


def test_every_rule_is_a_setting_of_the_config_when_it_has_one():
    config = pytest.importorskip("capfilt.pipelines.config")
    if not hasattr(config, "PrefilterSettings"):
        pytest.skip("no PrefilterSettings in this checkout")
    fields = {f.name for f in dataclasses.fields(config.PrefilterSettings)}
    assert {r.name for r in RULES} | {"min_language_score", "columns"} <= fields
    active, skipped = active_rules(config.PrefilterSettings(), {"caption", "punsafe"}, None)
    assert active == [] and skipped == {}  # the defaults drop nothing


def test_rules_that_are_off_are_neither_active_nor_skipped():
    active, skipped = active_rules(Settings(blocklist=["", "  "], languages=[]), set(), LAION_COLUMNS)
    assert active == [] and skipped == {}
    # 0.0 is a limit for the float rules, not "off"
    active, _ = active_rules(Settings(max_punsafe=0.0, min_similarity=0.0), {"punsafe", "similarity"}, None)
    assert [a.name for a in active] == ["max_punsafe", "min_similarity"]


def test_rules_whose_column_is_absent_are_skipped_with_the_reason():
    s = Settings(max_punsafe=0.5, max_pwatermark=0.5, min_width=10, max_aspect_ratio=2.0, min_caption_chars=3)
    active, skipped = active_rules(s, {"uid", "url", "caption", "pwatermark", "input_WIDTH"}, s.columns)
    assert [a.name for a in active] == ["max_pwatermark", "min_width", "min_caption_chars"]
    assert skipped == {"max_punsafe": "column punsafe is absent (nor input_punsafe)",
                       "max_aspect_ratio": "column HEIGHT is absent (nor input_HEIGHT)"}
    _, skipped = active_rules(s, {"punsafe", "pwatermark", "WIDTH", "HEIGHT"}, s.columns)
    assert skipped == {"min_caption_chars": "column caption is absent"}


def test_resolve_column_takes_the_exact_name_before_input_prefix():
    assert resolve_column("WIDTH", {"WIDTH", "input_WIDTH"}) == "WIDTH"
    assert resolve_column("WIDTH", {"input_WIDTH", "width"}) == "input_WIDTH"
    assert resolve_column("WIDTH", {"width"}) is None  # exact only: width is the pipeline's own column
    assert resolve_column(None, {"None"}) is None and resolve_column("", {""}) is None


def test_columns_map_points_a_role_at_another_column_or_at_none():
    s = Settings(max_punsafe=0.5, min_height=100, columns={"punsafe": "nsfw", "height": None})
    active, skipped = active_rules(s, {"nsfw", "HEIGHT"}, s.columns)
    assert [(a.name, a.column("punsafe")) for a in active] == [("max_punsafe", "nsfw")]
    assert skipped == {"min_height": "no column is set for height (prefilter.columns.height)"}
    # a role left out of the map takes LAION's name
    active, _ = active_rules(Settings(min_width=5, columns={}), {"input_WIDTH"}, {})
    assert active[0].column("width") == "input_WIDTH"


# --- metadata --------------------------------------------------------------------------------------

def test_punsafe_drops_above_the_limit_and_never_on_null_or_nan():
    frame = laion([{"punsafe": 0.93}, {"punsafe": 0.5}, {"punsafe": None}, {"punsafe": float("nan")},
                   {"punsafe": 0.12}])
    assert frame["punsafe"].dtype == np.float64
    reason, detail = run(frame, max_punsafe=0.5)
    assert reason == ["punsafe", None, None, None, None]
    assert detail == ["punsafe 0.93 > 0.5", None, None, None, None]


def test_pwatermark_and_similarity_limits():
    frame = laion([{"pwatermark": 0.81}, {"similarity": 0.21}, {"similarity": 0.28}, {}])
    reason, detail = run(frame, max_pwatermark=0.8, min_similarity=0.28)
    assert reason == ["pwatermark", "low_similarity", None, None]
    assert detail[:2] == ["pwatermark 0.81 > 0.8", "similarity 0.21 < 0.28"]


def test_numeric_columns_holding_strings_count_numbers_and_ignore_the_rest():
    frame = laion([{"punsafe": "0.93"}, {"punsafe": "abc"}, {"punsafe": b"0.9"}, {"punsafe": [0.9]},
                   {"punsafe": True}, {"punsafe": None}, {"punsafe": " 0.7 "}, {"punsafe": "inf"}])
    assert frame["punsafe"].dtype == object
    reason, _ = run(frame, max_punsafe=0.5)
    assert reason == ["punsafe", None, None, None, None, None, "punsafe", "punsafe"]
    assert np.isnan(numeric(pd.Series([True, False]))).all()
    assert list(numeric(pd.Series([1, 2], dtype="Int64"))) == [1.0, 2.0]
    assert np.isnan(numeric(pd.Series([1, None], dtype="Int64"))[1])


def test_image_size_from_input_prefixed_columns_with_float_nan_and_zero_as_unknown():
    frame = laion([{"WIDTH": 120, "HEIGHT": 900.0}, {"WIDTH": 800, "HEIGHT": 90.0}, {"WIDTH": 800, "HEIGHT": None},
                   {"WIDTH": 0, "HEIGHT": 0.0}, {"WIDTH": 256, "HEIGHT": 256.0}])
    assert frame["input_WIDTH"].dtype == np.int64 and frame["input_HEIGHT"].dtype == np.float64
    reason, detail = run(frame, min_width=256, min_height=256)
    assert reason == ["image_too_small", "image_too_small", None, None, None]
    assert detail[:2] == ["width 120 < 256", "height 90 < 256"]


def test_aspect_ratio_is_long_side_over_short_side():
    frame = laion([{"WIDTH": 1200, "HEIGHT": 300}, {"WIDTH": 300, "HEIGHT": 1200}, {"WIDTH": 600, "HEIGHT": 300},
                   {"WIDTH": 600, "HEIGHT": None}, {"WIDTH": -5, "HEIGHT": 300}])
    reason, detail = run(frame, max_aspect_ratio=2.0)
    assert reason == ["aspect_ratio", "aspect_ratio", None, None, None]
    assert detail[0] == "aspect ratio 4 (1200x300) > 2"


def test_the_first_failing_rule_in_rules_order_names_the_row():
    frame = laion([{"punsafe": 0.99, "caption": "x", "WIDTH": 10},
                   {"caption": "x", "WIDTH": 10},
                   {"caption": "x"},
                   {"caption": "Ein Hund sitzt auf dem Rasen im Garten und spielt mit einem Ball"}])
    reason, _ = run(frame, max_punsafe=0.5, min_width=64, min_caption_chars=3, languages=["en"])
    assert reason == ["punsafe", "image_too_small", "caption_too_short", "language"]


def test_a_kept_row_has_no_reason_and_no_detail_and_the_index_is_kept():
    frame = laion([{"punsafe": 0.9}, {}]).set_index(pd.Index([10, 3]))
    s = Settings(max_punsafe=0.5)
    reason, detail = prefilter_frame(frame, s, active_rules(s, set(frame.columns), s.columns)[0])
    assert list(reason.index) == [10, 3] and list(detail.index) == [10, 3]
    assert reason[3] is None and detail[3] is None
    empty = frame.iloc[:0]
    reason, detail = prefilter_frame(empty, s, active_rules(s, set(frame.columns), s.columns)[0])
    assert len(reason) == 0 and len(detail) == 0


# --- captions ----------------------------------------------------------------------------------------

def test_caption_length_counts_code_points_after_strip_and_null_as_empty():
    assert caption_chars("  héllo 😀 \n") == 7
    assert caption_chars(None) == 0 and caption_chars(float("nan")) == 0
    frame = laion([{"caption": "  abcd  "}, {"caption": "abcde"}, {"caption": None}, {"caption": "x" * 11}])
    reason, detail = run(frame, min_caption_chars=5, max_caption_chars=10)
    assert reason == ["caption_too_short", None, "caption_too_short", "caption_too_long"]
    assert detail == ["caption 4 chars < 5", None, "caption 0 chars < 5", "caption 11 chars > 10"]


def test_caption_words_are_whitespace_tokens_and_two_cjk_characters():
    assert caption_words("a  red\tbicycle\n") == 3
    assert caption_words("red - bicycle") == 3  # a token is a word, punctuation or not
    assert caption_words("红色连衣裙") == 3  # 5 Han characters: 2 + 2 + 1
    assert caption_words("女士碎花夏季连衣裙，所有尺码均有货") == 9  # CJK punctuation splits, counts nothing
    assert caption_words("iPhone用ケース 黒") == 4
    assert caption_words("빨간 드레스") == 2  # Korean writes spaces
    assert caption_words(None) == 0 and caption_words("   ") == 0
    frame = laion([{"caption": "Red"}, {"caption": "Red dress"}, {"caption": "one two three four"},
                   {"caption": "赤いドレス"}])
    reason, detail = run(frame, min_caption_words=2, max_caption_words=3)
    assert reason == ["caption_too_short", None, "caption_too_long", None]
    assert detail[2] == "caption 4 words > 3"


def test_blocklist_matches_whole_words_only():
    entries = ["ass", "Hot Dog", "c++"]
    for caption, hit in [("class photo", None), ("a passage", None), ("assassin's creed", None),
                         ("Ass hat", "ass"), ("kick-ass", "ass"), ("my ASS.", "ass"), ("ass", "ass"),
                         ("a hot\n  dog stand", "Hot Dog"), ("hotdog", None), ("learn C++ fast", "c++"),
                         ("snake_ass", None), ("ass2", None)]:
        assert blocklist_match(caption, entries) == hit, caption


def test_blocklist_is_unicode_aware():
    entries = ["straße", "ｆｏｏ", "राम", "色情", "ŝerco", "ß"]
    assert blocklist_match("STRASSE sign", entries) == "straße"  # case folding
    assert blocklist_match("foo fighters", entries) == "ｆｏｏ"  # NFKC both sides
    assert blocklist_match("ｆｏｏ　fighters", entries) == "ｆｏｏ"
    assert blocklist_match("राम आया", entries) == "राम"
    assert blocklist_match("रामायण", entries) is None  # a vowel sign continues the word
    assert blocklist_match("这是色情图片", entries) == "色情"  # Chinese: no spaces, matched anywhere
    assert blocklist_match("Ŝerco kaj ludo", entries) == "ŝerco"
    assert blocklist_match("Café sign", entries) is None


def test_blocklist_rule_names_the_entry_and_blocklist_patterns_the_pattern():
    frame = laion([{"caption": "Class of 2020"}, {"caption": "Kick-ASS t-shirt"}, {"caption": "BUY  NOW, cheap"},
                   {"caption": None}, {"caption": "order #12345"}])
    reason, detail = run(frame, blocklist=["ass"], blocklist_patterns=[r"\bbuy\s+now\b", r"#\d{5}"])
    assert reason == [None, "blocklist", "blocklist", None, "blocklist"]
    assert detail == [None, 'blocklist: "ass"', r'blocklist pattern: "\bbuy\s+now\b"', None,
                      r'blocklist pattern: "#\d{5}"']


def test_a_bad_pattern_fails_when_the_rules_are_made_naming_it():
    with pytest.raises(ValueError, match=r"blocklist_patterns: '\(unclosed' is not a regular expression"):
        active_rules(Settings(blocklist_patterns=["ok", "(unclosed"]), {"caption"}, LAION_COLUMNS)


def test_a_pattern_that_backtracks_in_python_matches_in_linear_time():
    # (a+)+$ against a run of a's that does not end the caption: 2**n paths for Python's re (2 s at 24
    # characters, minutes at 35), one pass for RE2. A pattern must never hold a worker.
    frame = laion([{"caption": "a" * 40 + "!"}, {"caption": "x" + "a" * 10_000}, {"caption": "AAAA"}])
    started = time.perf_counter()
    reason, detail = run(frame, blocklist_patterns=["(a+)+$", r"(x+x+)+y"])
    assert time.perf_counter() - started < 2.0
    assert reason == [None, "blocklist", "blocklist"] and detail[2] == 'blocklist pattern: "(a+)+$"'


@pytest.mark.parametrize("pattern, says", [(r"(a)\1", "needs a backtracking regex engine"),
                                           (r"(?<=buy )now", "needs a backtracking regex engine"),
                                           (r"(?!x)y", "needs a backtracking regex engine"),
                                           ("(unclosed", "is not a regular expression")])
def test_a_pattern_re2_cannot_run_is_refused_naming_it(pattern, says):
    with pytest.raises(ValueError, match="blocklist_patterns: ") as e:
        active_rules(Settings(blocklist_patterns=["ok", pattern]), {"caption"}, LAION_COLUMNS)
    assert says in str(e.value) and repr(pattern) in str(e.value) and "\n" not in str(e.value)


def test_a_long_blocklist_is_one_trie_regex_and_stays_fast():
    rng = np.random.default_rng(0)
    entries = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 7)) for _ in range(5000)] + ["bad word"]
    captions = [f"a plain caption number {i} about bicycles and trees" for i in range(3000)] + ["this bad  word"]
    frame = laion([{"caption": c} for c in captions])
    start = time.perf_counter()
    reason, detail = run(frame, blocklist=entries)
    assert time.perf_counter() - start < 5  # ~0.2 s here
    assert reason.count("blocklist") == 1 and detail[-1] == 'blocklist: "bad word"'


HOSTILE = ["x" * 1_000_000, "lone \udcff surrogate \ud800", "nul\x00 and\x1b[31m escapes\x7f\x85",
           "\u202eevil rtl\u202c text", "👨‍👩‍👧‍👦" * 200, "\n\n\t  \r", "", "a\u0301" * 1000,
           "(" * 5000 + "a" * 5000, "ａｓｓ", "https://example.com/" + "a" * 5000]


def test_hostile_captions_pass_through_every_caption_rule():
    frame = laion([{"caption": c} for c in HOSTILE] + [{"caption": 42}, {"caption": b"bytes"},
                                                      {"caption": float("nan")}])
    reason, detail = run(frame, min_caption_chars=1, max_caption_chars=100_000, min_caption_words=1,
                         max_caption_words=10_000, blocklist=["ass", "evil"], blocklist_patterns=["a{3}$"],
                         languages=["en"], min_language_score=0.5)
    assert reason[0] == "caption_too_long"
    assert reason[5] == reason[6] == "caption_too_short" and reason[-1] == "caption_too_short"
    assert reason[3] == "blocklist" and reason[9] == "blocklist"
    assert all(d is None or len(d) < 200 for d in detail)


def test_language_detector_survives_hostile_text_in_bounded_time():
    start = time.perf_counter()
    out = detect_languages(HOSTILE + [None, 3.5, b"bytes"])
    assert time.perf_counter() - start < 2
    for code, score in out:
        assert code is None or isinstance(code, str)
        assert 0.0 <= score <= 1.0
    assert out[5] == out[6] == out[-3] == out[-2] == out[-1] == (None, 0.0)


# --- language -----------------------------------------------------------------------------------------

def eval_set() -> list[dict]:
    return [json.loads(line) for line in CAPTIONS.read_text(encoding="utf-8").splitlines()]


def test_language_detector_on_hand_written_captions_in_twelve_languages():
    rows = [r for r in eval_set() if r["lang"] != "und"]
    got = detect_languages([r["text"] for r in rows])
    right = [code == r["lang"] for r, (code, _) in zip(rows, got)]
    long = [ok for r, ok in zip(rows, right) if caption_words(r["text"]) > 3]
    assert sum(right) / len(right) >= 0.88  # 0.921 measured when py3langid was chosen
    assert sum(long) / len(long) >= 0.95  # 0.988
    for lang in {r["lang"] for r in rows}:
        mine = [ok for r, ok in zip(rows, right) if r["lang"] == lang]
        assert sum(mine) / len(mine) >= 0.75, lang  # the weakest, nl, 0.82
    assert {code for code, _ in got} <= set(language._model().codes)


def test_detector_codes_are_iso_639_1_with_macrolanguages_folded():
    codes = language._model().codes
    assert {"en", "de", "zh", "ja", "ar"} <= set(codes)
    assert not {"wuu", "yue", "arz", "ary"} & set(codes)
    assert detect_languages(["新郎新娘在婚宴上跳舞"])[0][0] == "zh"
    assert language._model() is language._model()  # one load per process


def test_none_empty_and_letterless_captions_have_no_language():
    assert detect_languages([None, "", "   \n\t", "12345", "★★★★★"]) == [(None, 0.0)] * 5
    code, score = detect_languages(["BMW X5"])[0]  # the model's "no linguistic content"
    assert code is None and score > 0.5


def test_language_rule_drops_only_a_confident_other_language():
    frame = laion([{"caption": "Ein Golden-Retriever-Welpe sitzt im Garten auf dem Rasen"},
                   {"caption": "A golden retriever puppy sitting on the grass in the garden"},
                   {"caption": "Salon moderne"},     # short: the detector is unsure, the row stays
                   {"caption": "IMG_2034.JPG"}, {"caption": "BMW X5"}, {"caption": None},
                   {"caption": "Un chiot golden retriever assis sur l'herbe dans le jardin"}])
    reason, detail = run(frame, languages=["EN-us", "fr"], min_language_score=0.5)
    assert reason == ["language", None, None, None, None, None, None]
    assert detail[0].startswith("language de (0.") and detail[0].endswith(") not in en, fr")


def test_language_policy_rarely_drops_a_caption_in_an_allowed_language():
    """The policy as measured when it was chosen: with each language allowed alone, at 0.5 the rule
    wrongly dropped 0.6% of its captions (at 0: 7.9%) and kept out 96% of the longer ones in the other
    eleven languages."""
    rows = [r for r in eval_set() if r["lang"] != "und"]
    frame = laion([{"caption": r["text"]} for r in rows])
    wrong_drops = kept_long_other = long_other = 0
    for lang in sorted({r["lang"] for r in rows}):
        reason, _ = run(frame, languages=[lang], min_language_score=0.5)
        for r, why in zip(rows, reason):
            if r["lang"] == lang:
                wrong_drops += why is not None
            elif caption_words(r["text"]) > 3:
                long_other += 1
                kept_long_other += why is None
    assert wrong_drops / len(rows) <= 0.02
    assert kept_long_other / long_other <= 0.15


def test_detector_model_ships_in_the_wheel_and_loads_with_no_network():
    import py3langid
    assert (Path(py3langid.__file__).parent / "data" / "model.npz.xz").stat().st_size > 1_000_000
    script = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "socket.create_connection = socket.getaddrinfo = refuse\n"
        "from capfilt.udfs.language import detect_languages\n"
        "print(detect_languages(['Zwei Kinder lesen zusammen ein Buch in der Bibliothek'])[0][0])\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "de"
