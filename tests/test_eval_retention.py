"""Retention: the general-data probe, its perplexity, and the guardrail's warn / stop."""
import math

import pytest

from tailorlm.config import RetentionSpec, TemplateSpec
from tailorlm.errors import DataError, TailorError
from tailorlm.eval.retention import RetentionProbe
from conftest import write


def test_builtin_general_set_loads_as_chat_samples(tiny_tokenizer):
    probe = RetentionProbe.load(RetentionSpec(limit=10), tiny_tokenizer, TemplateSpec(), seed=1)
    assert probe.source == "builtin:general" and len(probe.samples) == 10
    sample = probe.samples[0]
    answer = tiny_tokenizer.decode([t for t in sample.labels if t != -100])
    assert answer.endswith("<|im_end|>") and answer.strip("<|im_end|>") == sample.example["output"]
    again = RetentionProbe.load(RetentionSpec(limit=10), tiny_tokenizer, TemplateSpec(), seed=1)
    assert [s.input_ids for s in again.samples] == [s.input_ids for s in probe.samples]  # seeded slice


def test_a_users_own_retention_file(tmp_path, tiny_tokenizer):
    data = write(tmp_path / "general.jsonl", '{"messages": [{"role": "user", "content": "the film"}, '
                                             '{"role": "assistant", "content": "won an award"}]}\n')
    probe = RetentionProbe.load(RetentionSpec(data=str(data)), tiny_tokenizer, TemplateSpec(), seed=0)
    assert len(probe.samples) == 1 and probe.samples[0].example["output"] == "won an award"
    assert RetentionProbe.load(RetentionSpec(data=None), tiny_tokenizer, TemplateSpec(), seed=0) is None
    with pytest.raises(DataError, match=r"missing.jsonl: file not found"):
        RetentionProbe.load(RetentionSpec(data=str(tmp_path / "missing.jsonl")), tiny_tokenizer, TemplateSpec(), 0)


def test_perplexity_and_change_against_the_base(tiny_tokenizer):
    probe = RetentionProbe.load(RetentionSpec(limit=4), tiny_tokenizer, TemplateSpec(), seed=0)
    losses = iter([2.0, 2.5])
    first = probe.measure(None, lambda model, samples: next(losses))
    second = probe.measure(None, lambda model, samples: next(losses))
    assert first == {"retention_ppl": pytest.approx(math.exp(2.0)), "retention_change": 0.0}
    assert second["retention_change"] == pytest.approx(math.exp(0.5) - 1)


def test_guardrail_warns_or_stops_past_the_limit(tiny_tokenizer, capsys):
    spec = RetentionSpec(limit=2, max_increase=0.25, action="warn")
    probe = RetentionProbe.load(spec, tiny_tokenizer, TemplateSpec(), seed=0)
    probe.base_ppl = 10.0
    probe.guard({"retention_ppl": 12.0, "retention_change": 0.2}, 5)  # within the limit: silent
    assert capsys.readouterr().out == ""
    probe.guard({"retention_ppl": 13.0, "retention_change": 0.3}, 5)
    out = capsys.readouterr().out.replace("\n", "")
    assert "warning: retention guardrail: at step 5 the perplexity of general data (builtin:general) is 13.00, " \
           "+30% over the base model's 10.00 (limit +25%)" in out
    probe.guard({"retention_ppl": 14.0, "retention_change": 0.4}, 6)  # the advice once; then one short line each
    assert capsys.readouterr().out.replace("\n", "") == \
        "warning: retention guardrail: at step 6 still +40% over the base model"
    probe.spec = RetentionSpec(action="error")
    with pytest.raises(TailorError, match=r"retention guardrail: at step 7 .*\+30% over the base model's 10.00 "
                                          r"\(limit \+25%\); the model is forgetting general skills.*; the checkpoint "
                                          r"of this step is kept$"):
        probe.guard({"retention_ppl": 13.0, "retention_change": 0.3}, 7)


def test_a_run_stops_on_the_guardrail_and_keeps_its_checkpoint(tmp_path, tiny_model_dir, capsys):
    import json

    from tailorlm.cli import main
    from conftest import labeled_csv

    out = tmp_path / "out"
    code = main(["run", f"model.path={tiny_model_dir}", f"data.train={labeled_csv(tmp_path / 'd.csv')}", "--output",
                 str(out), "method.name=full", "train.lr=0.05", "train.max_steps=6", "train.eval_every=2",
                 "train.batch_size=4", "eval.baselines=[]", "eval.during_training=0", "eval.retention.limit=8",
                 "eval.retention.max_increase=0.01", "eval.retention.action=error", "template.max_length=96"])
    assert code == 2
    import re

    step = int(re.search(r"retention guardrail: at step (\d+)", capsys.readouterr().out.replace("\n", "")).group(1))
    assert step in (2, 4, 6)  # the first evaluation past the limit
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()


def test_retention_is_measured_once_for_each_set_of_weights(tmp_path, tiny_model_dir, monkeypatch):
    import json

    from tailorlm.cli import main
    from conftest import labeled_csv

    passes = []
    measure = RetentionProbe.perplexity
    monkeypatch.setattr(RetentionProbe, "perplexity", lambda self, *a: passes.append(1) or measure(self, *a))
    out = tmp_path / "out"
    assert main(["run", f"model.path={tiny_model_dir}", f"data.train={labeled_csv(tmp_path / 'd.csv')}", "--output",
                 str(out), "method.name=full", "train.lr=0.02", "train.max_steps=6", "train.eval_every=2",
                 "train.batch_size=4", "eval.baselines=[]", "eval.during_training=0", "eval.retention.limit=8",
                 "template.max_length=96"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    at = {e["step"]: e for e in log["evaluations"]}
    assert sorted(at) == [0, 2, 4, 6]
    # the base model before training, then steps 2, 4 and 6: step 0 holds the base weights, and the final model
    # holds those of an evaluated step (the last, or the best one restored)
    assert len(passes) == 4
    retention = log["retention"]
    assert at[0]["retention_ppl"] == retention["base_ppl"] and at[0]["retention_change"] == 0.0
    assert retention["final_ppl"] == at[log["best_step"] or 6]["retention_ppl"]
    assert len({e["retention_ppl"] for e in at.values()}) > 1  # the weights did change
