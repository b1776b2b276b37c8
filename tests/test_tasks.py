"""Every task preset from data file to score, without a model: each example config's data loads and renders,
and a model that generated exactly the training completion would get the preset's best score."""
import re
from pathlib import Path

import pytest

from tailorlm.config import load_config
from tailorlm.data.dataset import load_splits
from tailorlm.data.templates import PromptTemplate

ROOT = Path(__file__).resolve().parents[1]
BEST = {"classification": ("accuracy", 1.0), "ner": ("f1", 1.0), "translation": ("bleu", 100.0),
        "math": ("exact_match", 1.0), "instruction": ("rouge_l", 1.0), "qa": ("exact_match", 1.0)}


def load_example(name: str, shared_data):
    cfg = load_config(ROOT / "examples" / f"{name}.yaml")
    template = PromptTemplate(cfg.template)
    import os
    cwd = os.getcwd()
    os.chdir(ROOT)  # example paths are relative to the repository root
    try:
        splits = load_splits(cfg.data, template.fields, template.label_field, template.task)
    finally:
        os.chdir(cwd)
    return cfg, template, splits


@pytest.mark.parametrize("name", ["sst2", "trec", "wnut17", "multi30k", "gsm8k", "alpaca"])
def test_example_config_loads_renders_and_scores(name, shared_data):
    cfg, template, splits = load_example(name, shared_data)
    limit = cfg.data.limit
    assert len(splits.train) == limit.train and len(splits.validation) == limit.validation
    test = splits.test[:40]
    prompts = [template.prompt(ex, splits.labels) for ex in test]
    completions = [template.completion(ex) for ex in test]
    assert all(p.strip() for p in prompts) and all(c.strip() for c in completions)
    key, best = BEST[cfg.template.preset]
    perfect, _ = template.task.score(completions, test, splits.labels)
    assert perfect[key] == pytest.approx(best)
    wrong, _ = template.task.score([completions[-1]] * len(test), test, splits.labels)
    assert wrong[key] < best


def test_ner_example_names_the_six_types(shared_data):
    _, template, splits = load_example("wnut17", shared_data)
    assert splits.labels == ["corporation", "creative-work", "group", "location", "person", "product"]
    ex = next(ex for ex in splits.train if ex["entities"])
    # the inline answer (the preset's default): the sentence copied, each entity marked where it stands
    completion = template.completion(ex)
    assert all(f"[{e['text']} | {e['type']}]" in completion for e in ex["entities"])
    assert re.sub(r"\[([^\[\]|]+) \| [a-z-]+\]", r"\1", completion) == ex["text"]
    assert "Types: corporation, creative-work" in template.prompt(ex, splits.labels)


def test_qa_preset_with_optional_context(tmp_path):
    from tailorlm.config import DataSpec, TemplateSpec

    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Capital of France?", "context": "", "answer": "Paris"}\n'
                    '{"question": "Who wrote Hamlet?", "context": "Hamlet is a play by Shakespeare.", "answer": "Shakespeare"}\n'
                    * 10)
    template = PromptTemplate(TemplateSpec(preset="qa"))
    splits = load_splits(DataSpec(train=str(path)), template.fields, template.label_field, template.task)
    ex = next(ex for ex in splits.train if ex["context"])
    assert template.prompt(ex, []).endswith("Context: Hamlet is a play by Shakespeare.\n\nQuestion: Who wrote Hamlet?")
    metrics, predicted = template.task.score(["The answer is Paris.", "shakespeare"],
                                             [{"answer": "Paris"}, {"answer": "Shakespeare"}], [])
    assert metrics["exact_match"] == 0.5 and predicted == ["The answer is Paris.", "shakespeare"]


def test_openai_messages_train_the_instruction_preset(tmp_path):
    from tailorlm.config import DataSpec, TemplateSpec
    from tailorlm.errors import DataError

    path = tmp_path / "chat.jsonl"
    turn = '{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]}\n'
    path.write_text(turn * 12)
    template = PromptTemplate(TemplateSpec(preset="instruction"))
    splits = load_splits(DataSpec(train=str(path)), template.fields, template.label_field, template.task)
    ex = splits.train[0]
    assert (template.prompt(ex, []), template.completion(ex)) == ("Say hi", "Hi!")
    long = tmp_path / "multi.jsonl"
    long.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
                    '{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}\n')
    with pytest.raises(DataError, match=r"line 1: a conversation of 4 turns besides the system's; .*template.preset=chat trains on whole conversations"):
        load_splits(DataSpec(train=str(long)), template.fields, template.label_field, template.task)
