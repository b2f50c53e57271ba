import pytest
import yaml

from pipelines.config import Config, ConfigError, describe, load_config
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
    from jobs.config import template
    shipped = (ROOT / "configs" / "default.yaml").read_text()
    assert load_config(ROOT / "configs" / "default.yaml") == Config()
    assert yaml.safe_load(shipped) == Config().to_dict(), "configs/default.yaml must list every key"
    assert shipped == template(), "regenerate with: capfilt config --template > configs/default.yaml"


def test_every_key_is_documented():
    assert all(help for _, _, help in describe()), [k for k, _, h in describe() if not h]
