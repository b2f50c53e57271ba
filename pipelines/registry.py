"""The chain: capfilt's stages in order, and the stages other packages add to it.

capfilt's own stages are the `DEFINITION`s of the modules of pipelines/ named in `BUILTIN`. Another package adds a
stage without touching capfilt: it declares a `Stage` (with `after`: the stage it runs after, and
`settings`: the dataclass of its config section, if it has settings) and names it in its packaging
metadata as an entry point of the group `capfilt.stages`, e.g. in its pyproject.toml

    [project.entry-points."capfilt.stages"]
    ocr_text = "my_package.ocr:STAGE"

`capfilt curate` then runs it in the chain, `capfilt ocr_text` runs it alone, `--set ocr_text.key=...`
sets its settings, and inspect shows its rejects (docs/architecture.md).
"""
from __future__ import annotations

import functools
import importlib

BUILTIN = ("download_stage", "caption", "filter", "decontaminate", "heads", "target", "dedup", "balance")  # modules of pipelines/
GROUP = "capfilt.stages"


@functools.cache
def stages() -> tuple:
    """Every stage in chain order: capfilt's, with each added stage placed after the one it names."""
    from importlib.metadata import entry_points

    from capfilt.pipelines.stage import Stage
    chain = [importlib.import_module(f"capfilt.pipelines.{name}").DEFINITION for name in BUILTIN]
    added = []
    for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
        try:
            stage = point.load()
        except Exception as e:  # a broken plugin is named, not a traceback from deep in a job
            raise ValueError(f"the stage {point.name!r} ({point.value}, entry point group {GROUP}) does not "
                             f"load: {type(e).__name__}: {e}") from None
        if not isinstance(stage, Stage):
            raise ValueError(f"entry point {point.name!r} ({point.value}) is a {type(stage).__name__}, not a "
                             f"capfilt Stage")
        added.append(stage)
    for stage in added:
        names = [s.name for s in chain]
        _check_name(stage, names)
        _check_sections(stage, [s for other in chain for s in other.inspect])
        if stage.after not in names:
            raise ValueError(f"the stage {stage.name!r} ({GROUP}) must name the stage it runs after "
                             f"(after=one of {', '.join(names)}), not {stage.after!r}")
        chain.insert(names.index(stage.after) + 1, stage)
    return tuple(chain)


def _check_name(stage, names: list[str]) -> None:
    """An added stage's name becomes a folder (OUT/stages/<name>), a command and a config section: it must
    be a plain lower-case name that no stage or config section already uses (jobs/cli.py refuses one that
    a command uses)."""
    import dataclasses
    import re

    from capfilt.pipelines.config import Config
    taken = {*names, *(f.name for f in dataclasses.fields(Config)), "write", "prefilter"}
    if not isinstance(stage.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", stage.name):
        raise ValueError(f"the stage {stage.name!r} ({GROUP}): a stage's name is lower-case letters, digits and _ "
                         f"(it names a folder, a command and a config section)")
    if stage.name in taken:
        raise ValueError(f"the stage {stage.name!r} ({GROUP}) has the name of a stage or a config section "
                         f"capfilt already has: rename it")


def _check_sections(stage, taken: list) -> None:
    """An added stage's `inspect` holds Sections whose keys no other stage's section uses (each names the
    stage's figures in the report)."""
    from capfilt.pipelines.stage import Section
    sections = list(stage.inspect) if isinstance(stage.inspect, (tuple, list)) else [stage.inspect]
    if not all(isinstance(s, Section) for s in sections):
        raise ValueError(f"the stage {stage.name!r} ({GROUP}): inspect must be a tuple of capfilt Sections")
    keys = [s.key for s in sections]
    clash = sorted({k for k in keys if keys.count(k) > 1} | (set(keys) & {s.key for s in taken}), key=str)
    if clash:
        raise ValueError(f"the stage {stage.name!r} ({GROUP}): inspect section key {clash[0]!r} is used by "
                         f"another section: rename it")


def names() -> tuple[str, ...]:
    return tuple(s.name for s in stages())


def definition(name: str):
    """The Stage object of a stage in the chain, or of a filter step inside one (the prefilter)."""
    for stage in stages():
        for s in (stage, *stage.filters):
            if s.name == name:
                return s
    raise ValueError(f"no stage named {name!r} (stages: {', '.join(names())}); a stage from another package "
                     f"needs it installed (entry point group {GROUP})")


def active(cfg) -> tuple:
    """The chain this config runs: the first stage and every enabled stage after it."""
    chain = stages()
    return (chain[0], *(s for s in chain[1:] if s.enabled(cfg)))


def funnel() -> tuple[str, ...]:
    """The funnel's steps in order: each stage, after the filter steps it runs on its input first."""
    return tuple(name for s in stages() for name in (*(f.name for f in s.filters), s.name))


def settings_sections() -> dict:
    """{section: settings dataclass} of the stages that bring their own config section."""
    return {s.name: s.settings for s in stages() if s.settings is not None}
