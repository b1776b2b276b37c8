import pytest

from tailorlm.config import DEFAULT_LR, RunConfig, load_config, parse_override
from tailorlm.errors import ConfigError
from conftest import write


def test_default_config_is_the_embedded_bbc_job():
    cfg = load_config()
    assert cfg.data.train == "builtin:bbc_news"
    assert cfg.model.path == "default"
    assert cfg.method.name == "lora"
    assert cfg.output.name == "bbc-news"


def test_every_problem_is_listed_with_its_path_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", """\
model:
  path: default
train:
  lr: fast
  batchsize: 8
  epochs: 0
method:
  name: qlora-ish
evaluation: {}
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 5, problems
    text = str(info.value)
    assert str(path) in text
    assert "train.lr (line 4): Input should be a valid number" in text
    assert "train.batchsize (line 5): unknown key (did you mean 'batch_size'?)" in text
    assert "train.epochs (line 6): Input should be greater than 0" in text
    assert "method.name (line 8): Input should be 'lora', 'qlora', 'full', 'freeze' or 'gradual_unfreeze'" in text
    assert "evaluation (line 9): unknown key (did you mean 'eval'?)" in text


def test_overrides_are_typed_and_validated():
    cfg = load_config(None, ["train.lr=1e-4", "method.name=full", "eval.baselines=[zero_shot]"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.method.name == "full"
    assert cfg.eval.baselines == ["zero_shot"]
    with pytest.raises(ConfigError, match=r"train.batch_size: Input should be greater than 0"):
        load_config(None, ["train.batch_size=-1"])
    with pytest.raises(ConfigError, match="is not a key=value override"):
        parse_override("train.lr")


def test_learning_rate_defaults_by_method():
    assert RunConfig(method={"name": "full"}).lr == DEFAULT_LR["full"] < DEFAULT_LR["lora"] == RunConfig().lr


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["train.seed=7"])
    again = load_config(write(tmp_path / "c.yaml", cfg.to_yaml()))
    assert again.model_dump() == {**cfg.model_dump(), "output": again.output.model_dump()}
    assert again.train.seed == 7


def test_unreadable_or_invalid_yaml_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path / "broken.yaml", "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_label_names_take_integer_keys_as_the_description_shows(tmp_path):
    """The field's own example, {0: negative}, is YAML with integer keys; labels are matched as text."""
    cfg = load_config(write(tmp_path / "c.yaml", "data:\n  label_names: {0: negative, 1: positive}\n"))
    assert cfg.data.label_names == {"0": "negative", "1": "positive"}
    assert load_config(None, ["data.label_names={0: negative}"]).data.label_names == {"0": "negative"}
    assert load_config(write(tmp_path / "again.yaml", cfg.to_yaml())).data.label_names == {"0": "negative", "1": "positive"}


def test_label_names_refuse_keys_that_yaml_read_as_booleans(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "c.yaml", "data:\n  label_names:\n    yes: positive\n"))
    assert info.value.problems == ["data.label_names.1.[key] (line 2): Value error, YAML read this key as true; quote "
                                   "it (e.g. 'yes': positive) to mean the text (got True)"]
