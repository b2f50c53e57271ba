"""The one decision on a committed stage output (pipelines/provenance.py: decide), pure: no Spark, no files.
Every caller (a stage command, `capfilt curate`'s plan, the download's re-filter) takes it from here."""
from __future__ import annotations

import dataclasses

import pytest

from capfilt.pipelines.config import Config
from capfilt.pipelines.provenance import REFUSE, RESELECT, REUSE, RUN, decide
from capfilt.pipelines.registry import definition


def _config(**sections) -> dict:
    cfg = Config().to_dict()
    for key, value in sections.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    return cfg


def _committed(stage: str, source=None, previous: str | None = None, **sections) -> dict:
    chain = [[previous, "../x"], [stage, "."]] if previous else [[stage, "."]]
    return {"config": _config(**sections), "source": source, "chain": chain}


SOURCE = {"finished_at": "2026-12-07T10:00:00Z", "rows": 100}


def test_nothing_committed_or_overwrite_runs():
    filter_ = definition("filter")
    assert decide(filter_, None, _config(), SOURCE).action == RUN
    assert decide(filter_, _committed("filter", SOURCE), _config(), SOURCE, overwrite=True).action == RUN


def test_same_settings_and_source_are_reused_whatever_the_runtime_settings():
    manifest = _committed("caption", SOURCE, "download")
    assert decide(definition("caption"), manifest, _config(caption__batch_size=3), SOURCE,
                  previous="download").action == REUSE


def test_selection_settings_of_a_stage_that_keeps_its_scores_are_recomputed_without_the_model():
    d = decide(definition("filter"), _committed("filter", SOURCE, "caption"), _config(filter__threshold=0.9), SOURCE)
    assert d.action == RESELECT and d.changed == ("filter.threshold",)


def test_model_settings_are_refused_naming_the_key():
    d = decide(definition("filter"), _committed("filter", SOURCE), _config(filter__model="other"), SOURCE)
    assert d.action == REFUSE and "filter.model" in d.why
    d = decide(definition("caption"), _committed("caption", SOURCE), _config(caption__top_p=0.5), SOURCE)
    assert d.action == REFUSE and "caption.top_p" in d.why


def test_a_fused_pass_that_already_scored_with_this_runs_settings_needs_no_model():
    d = decide(definition("filter"), _committed("filter", SOURCE), _config(filter__model="other"), SOURCE,
               work_done=True)
    assert d.action == RESELECT


def test_a_stage_without_a_model_recomputes_whatever_changed():
    d = decide(definition("dedup"), _committed("dedup", SOURCE), _config(), {"finished_at": "later", "rows": 9})
    assert d.action == RESELECT and "another input" in d.why
    assert decide(definition("dedup"), _committed("dedup", SOURCE), _config(seed=4), SOURCE).action == RESELECT


def test_another_input_under_a_stage_command_is_refused_but_curate_recomputes_it():
    moved = {"finished_at": "later", "rows": 100}
    manifest = _committed("filter", SOURCE, "caption")
    assert decide(definition("filter"), manifest, _config(), moved).action == REFUSE
    assert decide(definition("filter"), manifest, _config(), moved, owns_chain=True, previous="caption").action == RUN


def test_a_stage_switched_on_before_it_changes_its_chain():
    manifest = _committed("dedup", SOURCE, "filter")
    d = decide(definition("dedup"), manifest, _config(), None, previous="heads", owns_chain=True)
    assert d.action == RESELECT and "another chain" in d.why
    assert decide(definition("dedup"), manifest, _config(), None, upstream_ran=True).action == RUN


def test_the_download_refilters_on_prefilter_settings_and_refuses_other_fetch_results():
    download = definition("download")
    spec = {"spec": {"path": "in.parquet"}, "digest": "a"}
    manifest = {"config": _config(), "source": spec}
    assert decide(download, manifest, _config(download__timeout=30.0), spec).action == REUSE  # how, not what
    d = decide(download, manifest, _config(prefilter__max_caption_chars=20), spec)
    assert d.action == RESELECT and d.changed == ("prefilter.max_caption_chars",)
    assert decide(download, manifest, _config(download__image_size=64), spec).action == REFUSE
    assert decide(download, manifest, _config(), {**spec, "digest": "b"}).action == REFUSE


def test_a_key_the_committed_run_did_not_know_is_stale_only_when_set_off_its_default():
    manifest = _committed("filter", SOURCE)
    del manifest["config"]["filter"]["clip_floor"]
    assert decide(definition("filter"), manifest, _config(), SOURCE).action == REUSE
    assert decide(definition("filter"), manifest, _config(filter__clip_floor=0.1), SOURCE).action == REFUSE


@pytest.mark.parametrize("name", ["download", "caption", "filter", "decontaminate", "heads", "dedup"])
def test_every_stage_is_stale_under_its_own_section(name):
    stage = definition(name)
    assert stage.config_keys[0] == name and name in Config().to_dict()
    assert dataclasses.fields(type(getattr(Config(), name))), name


def test_a_file_read_besides_the_rows_with_other_content_makes_the_output_stale():
    """balance.entries names the same path, the file holds other entries: recomputed (no model), the reason
    names the key and its content; the same content is reused; a manifest from before inputs were recorded
    is not stale for lack of them."""
    balance = definition("balance")
    manifest = _committed("balance", SOURCE, "dedup", balance__entries="e.txt") | {"inputs": {"balance.entries": "a"}}
    config = _config(balance__entries="e.txt")
    assert decide(balance, manifest, config, SOURCE, inputs={"balance.entries": "a"}).action == REUSE
    other = decide(balance, manifest, config, SOURCE, inputs={"balance.entries": "b"})
    assert other.action == RESELECT and other.changed == ("balance.entries (its content)",)
    moved = decide(balance, manifest, _config(balance__entries="f.txt"), SOURCE, inputs={"balance.entries": "b"})
    assert moved.changed == ("balance.entries",)
    older = {k: v for k, v in manifest.items() if k != "inputs"}
    assert decide(balance, older, config, SOURCE, inputs={"balance.entries": "b"}).action == REUSE
