import os

import pytest
import yaml

from capfilt.pipelines.config import MOVED, Config, ConfigError, describe, load_config
from tests.conftest import ROOT


def test_defaults_need_no_file():
    cfg = load_config()
    assert cfg.spark.master == "local[*]" and cfg.output.overwrite is False


def test_yaml_file_then_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\nspark:\n  arrow_batch_size: 256\n  conf: {spark.foo: 1}\n")
    cfg = load_config(f, ["spark.arrow_batch_size=1024", "output.overwrite=true"])
    assert (cfg.seed, cfg.spark.arrow_batch_size, cfg.output.overwrite) == (3, 1024, True)
    assert cfg.spark.conf == {"spark.foo": "1"}


@pytest.mark.parametrize("overrides, message", [
    (["spark.mastr=local"], "unknown config key 'spark.mastr' (did you mean 'spark.master'?)"),
    (["sparks.master=local"], "unknown config key 'sparks' (did you mean 'spark'?)"),
    (["spark.arrow_batch_size=many"], "spark.arrow_batch_size: expected an integer, got 'many'"),
    (["spark.arrow_batch_size=0"], "spark.arrow_batch_size: 0 is below the minimum 1"),
    (["spark.log_level=LOUD"], "spark.log_level: 'LOUD' is not one of"),
    (["output.overwrite=1"], "output.overwrite: expected true or false, got 1"),
    (["spark=3"], "spark: expected a mapping, got 3"),
    (["no-equals-sign"], "must look like key.path=value"),
])
def test_bad_keys_and_values_are_refused_with_their_path(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_shipped_default_config_matches_the_code_defaults():
    from capfilt.jobs.config import template
    shipped = (ROOT / "configs" / "default.yaml").read_text()
    assert load_config(ROOT / "configs" / "default.yaml") == Config()
    assert yaml.safe_load(shipped) == Config().to_dict(), "configs/default.yaml must list every key"
    assert shipped == template(), "regenerate with: capfilt config --template > configs/default.yaml"


def test_every_key_is_documented():
    assert all(help for _, _, help in describe()), [k for k, _, h in describe() if not h]


@pytest.mark.parametrize("override", ["filter.threshold=.nan", "caption.top_p=.NaN", "download.timeout=.inf",
                                      "download.max_aspect_ratio=.nan", "filter.percentile=-.inf",
                                      "dedup.caption_threshold=1.0e+400"])
def test_nan_and_infinity_are_refused_wherever_a_number_is_meant(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number"):
        load_config(None, [override])


def test_an_integer_too_large_for_a_float_is_refused_with_its_path():
    with pytest.raises(ConfigError, match=r"^download\.timeout: the number is too large"):
        load_config(None, ["download.timeout=" + "9" * 400])


def test_an_override_that_is_not_yaml_is_refused_with_its_key():
    with pytest.raises(ConfigError, match="override 'seed=\\[1': the value is not valid YAML"):
        load_config(None, ["seed=[1"])


def test_an_override_into_a_section_left_empty_in_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("spark:\n")
    assert load_config(tmp_path / "c.yaml", ["spark.master=local[1]"]).spark.master == "local[1]"


def test_a_folder_an_unreadable_or_a_binary_config_is_one_line(tmp_path, capsys):
    from capfilt.jobs.cli import main as cli
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"seed: 1\n\xff\xfe\x00garbage")
    locked = tmp_path / "locked.yaml"
    locked.write_text("seed: 1\n")
    locked.chmod(0)
    cases = [(tmp_path, "is a folder, not a YAML file"), (binary, "is not UTF-8 text")]
    if os.geteuid() != 0:  # root reads anything
        cases.append((locked, "cannot be read: Permission denied"))
    for path, message in cases:
        assert cli(["config", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"capfilt: error: config file {path} {message}") and err.count("\n") == 1, err


def test_the_cli_refuses_nan_with_one_line(capsys):
    from capfilt.jobs.cli import main as cli
    assert cli(["config", "--set", "filter.threshold=.nan"]) == 2
    assert capsys.readouterr().err == "capfilt: error: filter.threshold: expected a finite number, got nan\n"


def test_a_spark_conf_key_with_dots_can_be_set_on_the_command_line():
    cfg = load_config(None, ["spark.conf.spark.sql.shuffle.partitions=7", "spark.conf.spark.ui.enabled=false"])
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": "7", "spark.ui.enabled": "false"}


def test_a_setting_added_after_a_committed_run_makes_it_stale_only_when_set_off_its_default():
    from capfilt.pipelines.provenance import changed_keys
    recorded = Config().to_dict()
    del recorded["download"]["reduced_decode"]  # a download committed before the key existed
    now = Config().to_dict()
    assert changed_keys(recorded, now, ["download"]) == []
    now["download"]["reduced_decode"] = False
    assert changed_keys(recorded, now, ["download"]) == ["download.reduced_decode"]
    now["download"]["image_size"] = 128
    assert changed_keys(recorded, now, ["download"]) == ["download.image_size", "download.reduced_decode"]


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_a_moved_key_is_refused_naming_its_new_place_by_set_and_by_file(old, new, tmp_path, capsys):
    from capfilt.jobs.cli import main as cli
    message = f"config key '{old}' moved to '{new}'"
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{old}=[x]"])
    assert str(e.value) == message
    section, key = old.split(".")
    f = tmp_path / "old.yaml"
    f.write_text(yaml.safe_dump({section: {key: 0.4}}))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == message
    assert cli(["config", "--set", f"{old}=0.4"]) == 2
    assert capsys.readouterr().err == f"capfilt: error: {message}\n"


def test_decontamination_settings_live_in_their_own_section():
    cfg = load_config(None, ["decontaminate.sets=[evals]", "decontaminate.threshold=0.4",
                             "decontaminate.candidates=5", "decontaminate.verify=none",
                             "decontaminate.pixel_tolerance=3"])
    assert (cfg.decontaminate.sets, cfg.decontaminate.threshold, cfg.decontaminate.candidates,
            cfg.decontaminate.verify, cfg.decontaminate.pixel_tolerance) == (["evals"], 0.4, 5, "none", 3.0)
    assert not any(name.startswith("eval_") for name in Config().to_dict()["dedup"])


def test_a_decontaminate_output_recorded_under_the_old_keys_is_stale_not_passed_off():
    """A stage output committed before the move recorded dedup.eval_*, and no decontaminate section: the
    run's evaluation sets (never the empty default) make it stale, so it is recomputed, not reused."""
    from capfilt.pipelines.provenance import changed_keys
    recorded = Config().to_dict()
    del recorded["decontaminate"]
    recorded["dedup"].update(eval_sets=["evals"], eval_threshold=0.5, eval_candidates=10, eval_verify="pixels",
                             eval_pixel_tolerance=6.0)
    now = load_config(None, ["decontaminate.sets=[evals]"]).to_dict()
    assert changed_keys(recorded, now, ["decontaminate"]) == ["decontaminate.sets"]
    assert changed_keys(now, now, ["decontaminate"]) == []
