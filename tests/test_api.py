"""The Python API: tailorlm.run / tailorlm.load / Run, the same run as the CLI's, with in-memory data and models."""
import json

import pytest
import torch

import tailorlm
from conftest import labeled_csv
from tailorlm.cli import main

FAST = ["train.max_steps=3", "train.batch_size=4", "train.eval_every=2", "eval.few_shot_k=2", "template.max_length=96"]


def without_times(obj):
    """Metrics with the wall-clock figures taken out: everything else of two identical runs is identical."""
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


def test_the_cli_and_the_api_give_identical_metrics(tmp_path, tiny_model_dir):
    overrides = [f"model.path={tiny_model_dir}", f"data.train={labeled_csv(tmp_path / 'reviews.csv')}", *FAST]
    assert main(["run", *overrides, "-o", str(tmp_path / "cli")]) == 0
    run = tailorlm.run(overrides=overrides, output=tmp_path / "api")
    assert isinstance(run, tailorlm.Run) and run.path == tmp_path / "api"
    from_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert without_times(run.metrics) == without_times(from_cli)
    assert run.results["classification"].fine_tuned == from_cli["tasks"]["classification"]["variants"]["fine_tuned"][
        "accuracy"]
    assert (tmp_path / "api" / "predictions.jsonl").read_text() == (tmp_path / "cli" / "predictions.jsonl").read_text()
    loaded = tailorlm.load(tmp_path / "cli")
    assert without_times(loaded.metrics) == without_times(from_cli)
    assert loaded.headline.startswith("classification accuracy ") and " vs " in loaded.headline


def test_a_dataframe_in_a_run_out_and_nothing_global_changed(tmp_path, tiny_model_dir, monkeypatch):
    pd = pytest.importorskip("pandas")
    from transformers.utils import logging as hf_logging

    frame = pd.read_csv(labeled_csv(tmp_path / "reviews.csv"))
    verbosity, limit = hf_logging.get_verbosity(), torch._dynamo.config.recompile_limit
    run = tailorlm.run(data=frame, model=str(tiny_model_dir), output=tmp_path / "out", overrides=FAST,
                       eval__baselines=[])
    assert hf_logging.get_verbosity() == verbosity and torch._dynamo.config.recompile_limit == limit
    assert run.config.data.train == "memory:train"  # what the run was given, recorded as such
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["tasks"]["classification"]["labels"] == ["negative", "positive"]
    assert manifest["weights"] == "adapter" and manifest["base_model"] == str(tiny_model_dir)

    # the Run keeps the model it trained: predicting loads no second copy from the run directory
    from tailorlm.ops import engines

    def no_second_copy(*args, **kwargs):
        raise AssertionError("the trained model was loaded again from disk")

    monkeypatch.setattr(engines, "load_for_inference", no_second_copy)
    rows = run.predict(frame.head(5).drop(columns="label"))
    assert [r["row"] for r in rows] == [0, 1, 2, 3, 4] and all("expected" not in r for r in rows)
    assert all(isinstance(r["generated"], str) for r in rows)
    with_answers = run.predict([{"text": "a great movie", "label": "positive"}])
    assert with_answers[0]["expected"] == "positive"
    with run:
        assert isinstance(run.generate("a great movie", max_new_tokens=4), str)
        assert isinstance(run.chat([{"role": "user", "content": "hi"}], max_new_tokens=3), str)


def test_a_loaded_model_and_its_tokenizer_can_be_passed_in(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = tailorlm.run(data=str(labeled_csv(tmp_path / "reviews.csv")), model=model, tokenizer=tokenizer,
                       output=tmp_path / "out", overrides=FAST + ["eval.baselines=[]", "method.name=full",
                                                                   "train.lr=1e-3"])
    assert run.metrics["train"]["steps"] == 3
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the model given was the one trained
    with pytest.raises(tailorlm.TailorError, match=r"a loaded model needs its tokenizer too \(tokenizer=...\)$"):
        tailorlm.run(model=model, output=tmp_path / "again")


def test_config_errors_name_their_source(tmp_path):
    with pytest.raises(tailorlm.TailorError, match=r"<the config given to tailorlm.run>: 1 problem"):
        tailorlm.run({"train": {"lr": "fast"}}, output=tmp_path / "out")
    with pytest.raises(tailorlm.TailorError, match=r"not a run directory"):
        tailorlm.load(tmp_path)


def test_none_or_empty_data_is_refused_rather_than_replaced_by_the_configs(tmp_path, monkeypatch):
    import tailorlm.pipeline

    def would_train(cfg, *args, **kwargs):
        raise AssertionError(f"about to train on {cfg.data.train}, which the call did not pass")

    monkeypatch.setattr(tailorlm.pipeline, "run_stages", would_train)
    with pytest.raises(tailorlm.TailorError) as e:
        tailorlm.run(data={"train": None}, output=tmp_path / "out")
    assert str(e.value) == ("data={'train': None}: None is no training data; give a file path, a DataFrame, a list "
                            "of dicts or a Dataset, or leave 'train' out to train on the config's data.train")
    with pytest.raises(tailorlm.TailorError) as e:
        tailorlm.run(data={}, output=tmp_path / "out")
    assert str(e.value) == ("data={}: no splits given; pass {'train': ...} (and 'validation', 'test' when you have "
                            "them), or leave data out to use the config's data")
    with pytest.raises(tailorlm.TailorError) as e:
        tailorlm.run(tokenizer=object(), output=tmp_path / "out")
    assert str(e.value) == ("tailorlm.run(tokenizer=...): a tokenizer goes with a loaded model (model=...); a model "
                            "given as a path, or the config's, brings its own")
    assert not (tmp_path / "out").exists()


def test_keyword_settings_change_what_they_name_and_keep_the_rest(tmp_path, monkeypatch):
    """None for a held-out split means what null means in a config (split it off the training data); a dict
    for a section sets its keys without putting the section's other settings back to their defaults."""
    import tailorlm.pipeline

    seen = {}

    def capture(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop before anything runs

    monkeypatch.setattr(tailorlm.pipeline, "run_stages", capture)
    config = {"data": {"train": "a.csv", "validation": "v.csv", "test": "t.csv", "columns": {"text": "review"}},
              "train": {"max_steps": 3, "lr": 1e-3}}
    with pytest.raises(KeyboardInterrupt):
        tailorlm.run(config, data={"train": "b.csv", "test": None}, train={"batch_size": 2},
                     data__columns={"label": "stars"}, output=tmp_path / "out")
    cfg = seen["cfg"]
    assert (cfg.data.train, cfg.data.validation, cfg.data.test) == ("b.csv", "v.csv", None)
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.batch_size) == (3, 1e-3, 2)
    assert cfg.data.columns == {"label": "stars"}  # a mapping setting is replaced whole, as on the command line
