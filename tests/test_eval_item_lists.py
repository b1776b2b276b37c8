"""Constrained decoding of entity lists: the item grammar token by token, the tokens it forces against the
training completion's own, and NER baselines that answer only with real spans of their text."""
import torch

from tailorlm.config import EvalSpec, TemplateSpec
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_examples
from tailorlm.eval.baselines import run_baselines
from tailorlm.eval.evaluate import Evaluator
from tailorlm.eval.item_lists import ItemListTrie
from tailorlm.tasks.ner import candidate_entities, parse_entities
from conftest import tiny_llama

STOP = [0]
# item 0 = [1, 2], item 1 = [1, 2, 3] (a longer span with the same start), item 2 = [4]; 9 is the separator
TRIE = ItemListTrie(first=[[1, 2], [1, 2, 3], [4]], following=[[9, 1, 2], [9, 1, 2, 3], [9, 4]], empty=[7])


def test_the_answer_is_the_empty_word_or_distinct_items_joined_by_the_separator():
    assert TRIE.allowed([], STOP) == [1, 4, 7]
    assert TRIE.allowed([7], STOP) == [0]  # 'none' is the whole answer
    assert TRIE.allowed([1], STOP) == [2]
    assert TRIE.allowed([1, 2], STOP) == [0, 3, 9]  # item 0 is complete: stop, list another, or extend to item 1
    assert TRIE.allowed([1, 2, 9], STOP) == [1, 4]  # item 0 is spent, but item 1 still starts with 1
    assert TRIE.allowed([1, 2, 9, 1, 2], STOP) == [3]  # item 0 again may not end here: only item 1 goes on
    assert TRIE.allowed([1, 2, 9, 1, 2, 3], STOP) == [0, 9]
    assert TRIE.allowed([1, 2, 9, 1, 2, 3, 9], STOP) == [4]  # the one item not listed yet
    assert TRIE.allowed([1, 2, 9, 1, 2, 3, 9, 4], STOP) == [0]  # every item listed: only a stop
    assert TRIE.allowed([4, 0], STOP) == [0]  # past the stop token


def test_an_answer_cut_short_keeps_its_finished_items():
    assert TRIE.cut_unfinished([1, 2, 9, 1, 2]) == [1, 2]  # the second item may have been meant as [1, 2, 3]
    assert TRIE.cut_unfinished([1, 2, 3, 9, 4]) == [1, 2, 3]  # it may have been cut at a word's end too
    assert TRIE.cut_unfinished([1, 2]) == []
    assert TRIE.cut_unfinished([4, 0, 0]) == [4, 0, 0]  # it ended: nothing is cut


NER_LINES = [("the film rose in paris", [("product", "film"), ("location", "paris")]),
             ("john smith met the team", [("person", "john smith")]),
             ("the team won", []),
             ("paris fell", [("location", "paris")])]


def ner_setup(tokenizer, **eval_overrides):
    spec = TemplateSpec(preset="ner", entity_format="list", max_length=512)  # the item-list constraint's format
    template, fmt = PromptTemplate(spec), ChatFormat(tokenizer, spec)
    examples = [{"text": text, "entities": [{"type": t, "text": x} for t, x in ents], "_where": f"d.conll, line {i}"}
                for i, (text, ents) in enumerate(NER_LINES * 2, 1)]
    examples = [{**ex, **template.task.derive(ex)} for ex in examples]  # entities_text, as the data layer adds it
    labels = template.task.answer_set(examples)
    samples, _ = encode_examples(examples, template, fmt, labels, spec)
    evaluator = Evaluator(tokenizer, template, fmt, labels, EvalSpec(batch_size=3, **eval_overrides), torch.device("cpu"),
                          label_field=None)
    return evaluator, samples, examples


def test_the_forced_tokens_are_those_of_the_training_completion(tiny_tokenizer):
    evaluator, samples, examples = ner_setup(tiny_tokenizer)
    trie = evaluator.item_trie(examples[0])
    completion = tiny_tokenizer.encode(evaluator.fmt.completion_text("", "product: film; location: paris"),
                                       add_special_tokens=False)
    walked, prefix = completion[:-1], []  # the answer without its end-of-turn token, one token at a time
    for token in walked:
        assert token in trie.allowed(prefix, STOP), (tiny_tokenizer.decode(prefix), tiny_tokenizer.decode([token]))
        prefix.append(token)
    assert completion[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    items = candidate_entities(examples[0], evaluator.labels)
    assert "location: paris" in items and "person: the film rose in paris" in items and len(items) == 3 * 15


def lister(tokenizer, seed: int):
    """A random tiny model that never stops and never answers 'none', so it lists items until max_new_tokens
    cuts it: the test then sees many items, and an answer cut short."""
    model = tiny_llama(len(tokenizer), seed=seed)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.encode(" none")[0],
                   tokenizer.encode("none")[0]]] = -1e4
    model.lm_head = head
    return model


def test_constrained_ner_names_only_real_spans_of_its_text_and_each_once(tiny_tokenizer):
    model = lister(tiny_tokenizer, seed=6)
    evaluator, samples, examples = ner_setup(tiny_tokenizer, max_new_tokens=40)
    assert evaluator.kinds == ["free", "constrained"]  # a list answer has no likelihood kind
    result = evaluator.run(model, samples, "zero_shot_constrained", kind="constrained")
    named = 0
    for example, prediction in zip(examples, result.predictions):
        entities = parse_entities(prediction["generated"], evaluator.labels)
        words = example["text"].split()
        spans = {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
        assert all(kind in evaluator.labels and span in spans for kind, span in entities), prediction["generated"]
        assert len(set(entities)) == len(entities)
        named += len(entities)
    assert named > len(examples) and result.metrics["kind"] == "constrained"


def test_ner_baselines_have_the_free_and_constrained_kinds(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), seed=7)
    evaluator, samples, examples = ner_setup(tiny_tokenizer, few_shot_k=[0, 1, 2], max_new_tokens=12)
    out = run_baselines(model, evaluator, examples, samples, evaluator.spec, seed=0, report=lambda *a: None)
    # the prompting kinds, and the CRF tagger as extraction's classic model
    assert set(out.variants) == {"zero_shot", "zero_shot_constrained", "few_shot", "few_shot_constrained", "classic"}
    assert out.variants["classic"]["kind"] == "crf" and 0.0 <= out.variants["classic"]["f1"] <= 1.0
    # open answers: the curve is measured at its ends only, under the constrained kind
    assert out.curve["kind"] == "constrained" and [p["k"] for p in out.curve["points"]] == [0, 2]
