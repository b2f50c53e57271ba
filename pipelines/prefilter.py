"""The prefilter stage: pairs -> pairs (+ rejects), before download: a row it drops is never fetched.

Rules on the metadata's own columns (LAION's punsafe, pwatermark, similarity, WIDTH/HEIGHT), on the
caption's length, language and words (udfs/prefilter.py has each rule; udfs/language.py the
detector). Every rule is off by default. A rule whose column the input lacks is skipped and named in
the download manifest (`prefilter.skipped`) and on the console, never silently. Because it must act
before any request, it is a filter step of the download stage (`filters` in its declaration,
pipelines/download_stage.py), run on the pairs that passed the precheck, before robots.txt and the shard
plan; its rejects carry stage `prefilter`, and the funnel shows it as a step of its own. Changing only
prefilter settings re-filters a committed download (nothing fetched again, newly allowed rows fetched).
"""
from __future__ import annotations

import pandas as pd  # module level: mapInPandas's function reads it from these globals

from capfilt.pipelines.stage import Result, Stage, reject_rows
from capfilt.schemas import PAIRS

STAGE = "prefilter"


def _reasons() -> dict[str, str]:
    from capfilt.udfs.prefilter import RULES
    reasons: dict[str, list[str]] = {}
    for rule in RULES:
        reasons.setdefault(rule.reason, []).append(f"{rule.help} (prefilter.{rule.name})")
    return {reason: "; ".join(helps) + " (detail: the value and the limit)" for reason, helps in reasons.items()}


def enabled(cfg) -> bool:
    from capfilt.udfs.prefilter import RULES, is_on
    return any(is_on(rule, getattr(cfg.prefilter, rule.name)) for rule in RULES)


def check_settings(cfg) -> None:
    """One line before Spark starts for what would otherwise fail in a task or silently drop everything:
    a pattern that does not compile, a language the detector cannot name (`english` for `en` would make
    every caption 'not in the list')."""
    from capfilt.udfs.prefilter import active_rules
    if not enabled(cfg):
        return
    active_rules(cfg.prefilter, [])  # compiles the blocklist and its patterns, naming a bad one
    if cfg.prefilter.languages:
        from capfilt.udfs.language import known_languages
        known = set(known_languages())
        unknown = [code for code in cfg.prefilter.languages if code not in known]
        if unknown:
            raise ValueError(f"prefilter.languages: {', '.join(map(repr, unknown))} is not a language code the "
                             f"detector names (ISO 639-1, e.g. en, de, zh; known: {', '.join(sorted(known)[:12])}, ...)")


class _Marks:
    """mapInPandas: rows -> (uid, reason, detail) of the rows a rule drops."""

    def __init__(self, settings, active):
        self.settings, self.active = settings, active

    def __call__(self, frames):
        from capfilt.udfs.prefilter import prefilter_frame
        for frame in frames:
            reason, detail = prefilter_frame(frame, self.settings, self.active)
            hit = reason.notna()
            yield pd.DataFrame({"uid": frame["uid"][hit], "_reason": reason[hit], "_detail": detail[hit]})


def split(pairs, cfg, context=None) -> Result:
    """The kept pairs and the rejects, each rule's verdict per row (udfs/prefilter.py: every rule returns
    keep, or its reason and a detail naming the value and the limit); the report says which rules ran and
    which were skipped (their column is not in the input)."""
    from pyspark.sql import functions as F

    from capfilt.udfs.prefilter import active_rules
    active, skipped = active_rules(cfg.prefilter, pairs.columns)
    report = {"active": [a.name for a in active], "skipped": skipped}
    for name, why in skipped.items():
        print(f"[prefilter] rule {name} skipped: {why}", flush=True)
    if not active:
        return Result(pairs, reject_rows(pairs.limit(0), STAGE, "", ""), report)
    columns = list(dict.fromkeys(["uid", *(c for a in active for _, c in a.columns)]))
    marks = pairs.select(*[F.col("`" + c.replace("`", "``") + "`") for c in columns]).mapInPandas(_Marks(cfg.prefilter, active),
                                               "uid string, _reason string, _detail string")
    marked = pairs.join(marks, "uid", "left").localCheckpoint()
    dropped = marked.filter(marked["_reason"].isNotNull())
    return Result(marked.filter(marked["_reason"].isNull()).drop("_reason", "_detail"),
                  reject_rows(dropped, STAGE, dropped["_reason"], dropped["_detail"]), report)


DEFINITION = Stage(name=STAGE, reads=PAIRS, adds=(), reasons=_reasons(), split=split, enabled=enabled,
                   check=lambda cfg, input_root: check_settings(cfg))
