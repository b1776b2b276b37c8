"""Extraction answers: the three formats round trip, the strict span score equals seqeval's, and constrained
decoding keeps each format valid (inline can only copy the sentence, JSON must close its list)."""
from __future__ import annotations

import random
import re

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from tailorlm.eval.copying import InlineCopy
from tailorlm.eval.item_lists import item_list_trie
from tailorlm.tasks import get_task
from tailorlm.tasks.base import CopyAnswer
from tailorlm.tasks.entities import FORMATS, bio_tags, parse, place, render, span_scores
from tailorlm.tasks.ner import candidate_json_items

TYPES = ["person", "location", "product"]


def sentence(tokens: list[str], tags: list[str]) -> dict:
    from tailorlm.data.formats import bio_entities

    return {"tokens": tokens, "tags": tags, "text": " ".join(tokens), "entities": bio_entities(tokens, tags)}


EXAMPLES = [
    sentence("John Smith flew to Paris .".split(), ["B-person", "I-person", "O", "O", "B-location", "O"]),
    sentence("nothing to see here".split(), ["O"] * 4),
    # the same span twice, adjacent entities of one type, trailing punctuation inside a token
    sentence("Paris and Paris Texas U.S. iPhone".split(),
             ["B-location", "O", "B-location", "B-location", "B-location", "B-product"]),
    sentence("ask @john about it".split(), ["O", "B-person", "O", "O"]),
]


@pytest.mark.parametrize("entity_format", FORMATS)
def test_each_format_renders_and_parses_back_to_the_gold_entities(entity_format):
    for example in EXAMPLES:
        text = render(example, entity_format)
        gold = [(e["type"], e["text"].rstrip(".")) for e in example["entities"]]
        assert parse(text, TYPES, entity_format) == gold, text


def test_the_formats_read():
    first = EXAMPLES[0]
    assert render(first, "list") == "person: John Smith; location: Paris"
    assert render(first, "inline") == "[John Smith | person] flew to [Paris | location] ."
    assert render(first, "json") == '[{"type": "person", "text": "John Smith"}, {"type": "location", "text": "Paris"}]'
    assert [render(EXAMPLES[1], f) for f in FORMATS] == ["none", "nothing to see here", "[]"]


def test_parsing_is_lenient_about_layout_and_cut_off_answers():
    assert parse("[john smith|Person] flew to [ Paris | location ]", TYPES, "inline") == [
        ("person", "john smith"), ("location", "Paris")]
    cut = '[{"type": "person", "text": "John Smith"}, {"text": "Paris", "type": "location"}, {"type": "pers'
    assert parse(cut, TYPES, "json") == [("person", "John Smith"), ("location", "Paris")]
    assert parse('[{"type": "animal", "text": "cat"}]', TYPES, "json") == []  # unknown types are dropped


def test_the_span_score_equals_seqeval_on_the_rebuilt_tags():
    predicted = [[("person", "John Smith"), ("location", "paris")],  # both right (case aside)
                 [("person", "here")],  # a false positive
                 [("location", "Paris"), ("location", "Paris Texas"), ("product", "iPhone")],  # a wrong span
                 []]  # a miss
    scores = span_scores(predicted, EXAMPLES)
    gold = [ex["tags"] for ex in EXAMPLES]
    rebuilt = [bio_tags(len(ex["tokens"]), place(ex["tokens"], p)[0]) for ex, p in zip(EXAMPLES, predicted)]
    assert scores["precision"] == pytest.approx(precision_score(gold, rebuilt))
    assert scores["recall"] == pytest.approx(recall_score(gold, rebuilt))
    assert scores["f1"] == pytest.approx(f1_score(gold, rebuilt))
    assert (scores["correct"], scores["predicted"], scores["gold"]) == (4, 6, 8)
    report = classification_report(gold, rebuilt, output_dict=True)
    for kind, figures in scores["per_type"].items():
        assert figures["f1"] == pytest.approx(report[kind]["f1-score"]) and figures["support"] == report[kind]["support"]


def test_an_entity_not_in_the_sentence_is_a_false_positive_that_tags_alone_would_drop():
    scores = span_scores([[("person", "John Smith"), ("person", "Mary Jones")]], EXAMPLES[:1])
    assert (scores["correct"], scores["predicted"], scores["unplaced"]) == (1, 2, 1)
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5


def test_the_preset_scores_each_format_with_both_columns():
    for entity_format in FORMATS:
        task = get_task("ner", entity_format)
        answers = [render(ex, entity_format) for ex in EXAMPLES]
        metrics, shown = task.score(answers, EXAMPLES, TYPES)
        assert metrics["f1"] == 1.0 and metrics["text_f1"] == 1.0 and task.headline == "f1"
        assert shown[0] == "person: John Smith; location: Paris" and shown[1] == "none"


def _walk(constraint, tokenizer, stops, rng, limit=80) -> list[int]:
    ids: list[int] = []
    for _ in range(limit):
        allowed = constraint.allowed(ids, stops)
        token = rng.choice(allowed)
        if token in stops:
            break
        ids.append(token)
    return ids


def test_constrained_inline_decoding_can_only_copy_the_sentence(tiny_tokenizer):
    words = "John Smith flew to Paris .".split()
    stop = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(0)
    texts = set()
    for _ in range(40):  # random walks through every allowed token: whatever is chosen, the sentence is copied
        constraint = InlineCopy(tiny_tokenizer, words, TYPES, CopyAnswer(), opening=" ")
        text = tiny_tokenizer.decode(_walk(constraint, tiny_tokenizer, [stop], rng))
        texts.add(text)
        assert "[" not in re.sub(r"\[([^\[\]|]+) \| (person|location|product)\]", "", text), text  # marks well formed
        unmarked = re.sub(r"\[([^\[\]|]+) \| (?:person|location|product)\]", r"\1", text)
        assert unmarked.strip() == " ".join(words), text
    assert len(texts) > 5  # the walks did mark different spans
    constraint = InlineCopy(tiny_tokenizer, words, TYPES, CopyAnswer(), opening=" ")
    ids = tiny_tokenizer(" John Smith flew", add_special_tokens=False)["input_ids"]
    allowed = constraint.allowed(ids, [stop])
    assert stop not in allowed  # not every word is copied yet
    # every allowed token goes on with ' to' (or opens a mark on it), none skips ahead
    pieces = [constraint.pieces[t] for t in allowed]
    assert pieces and all(" to".startswith(p) or p.startswith(" to") or " [to".startswith(p) or p.startswith(" [t")
                          for p in pieces), pieces


def test_constrained_json_decoding_closes_the_list_before_it_stops(tiny_tokenizer):
    example = {"text": "John flew", "tokens": ["John", "flew"]}
    stop = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    trie = item_list_trie(tiny_tokenizer, candidate_json_items(example, TYPES), ", ", "[]", " ", "[", "]")
    rng = random.Random(1)
    for _ in range(20):
        text = tiny_tokenizer.decode(_walk(trie, tiny_tokenizer, [stop], rng, limit=2000))
        assert text.strip() == "[]" or text.rstrip().endswith("}]"), text
        assert parse(text, TYPES, "json") or text.strip() == "[]"


# --- extractive QA --------------------------------------------------------------------------------------------

def test_qa_data_counts_as_extractive_when_its_answers_sit_in_their_contexts():
    from tailorlm.tasks.qa import extractive_share, is_extractive

    rows = [{"question": "Where?", "context": "He flew to Paris, France.", "answer": "Paris"},
            {"question": "When?", "context": "It was in 1840 .", "answer": "in 1840"},
            {"question": "Who?", "context": "Nobody said.", "answer": "Monet"},
            {"question": "What?", "answer": "blue"}]  # no context: generated, not extracted
    assert extractive_share(rows) == 0.5 and not is_extractive(rows) and is_extractive(rows[:2])


def test_constrained_qa_decoding_writes_one_span_of_the_context(tiny_tokenizer):
    from tailorlm.eval.copying import SpanCopy

    words = "the painter Monet was born in Paris in 1840 .".split()
    stop = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng, spans = random.Random(3), set()
    for _ in range(40):
        constraint = SpanCopy(tiny_tokenizer, words, max_words=4, opening=" ")
        text = tiny_tokenizer.decode(_walk(constraint, tiny_tokenizer, [stop], rng)).strip()
        n = len(text.split())
        assert 1 <= n <= 4 and any(words[i:i + n] == text.split() for i in range(len(words))), text
        spans.add(text)
    assert len(spans) > 5


def test_the_sliding_window_picks_the_span_beside_the_question_words():
    from tailorlm.eval.sliding_window import answer_length, best_span

    filler = "The museum has many rooms and a garden with old trees . " * 3
    context = filler + "The painter Claude Monet was born in Paris in 1840 . " + filler
    assert answer_length(["Paris", "in 1840", "Claude Monet", "the garden"]) == 2
    answer = best_span("Where was Claude Monet born ?", context, 1)
    assert answer in "Paris 1840 painter".split()  # a content word of Monet's sentence, not of the filler
    assert best_span("Where ?", "", 1) == ""


def test_a_json_item_with_an_unknown_escape_is_dropped_and_the_others_kept():
    text = '[{"type": "person", "text": "a\\x"}, {"type": "location", "text": "Paris"}, {"type": "per'
    assert parse(text, TYPES, "json") == [("location", "Paris")]


def test_the_copy_constraint_answers_any_prefix_as_a_fresh_one_would(tiny_tokenizer):
    """It carries the last prefix's state over to the next step; a prefix that does not extend it starts over."""
    words = "John Smith flew to Paris .".split()
    stop = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tiny_tokenizer(" [John Smith | person] flew to", add_special_tokens=False)["input_ids"]
    reused = InlineCopy(tiny_tokenizer, words, TYPES, CopyAnswer(), opening=" ")
    for prefix in [ids[:n] for n in range(len(ids) + 1)] + [ids[:2], ids[:1], ids]:
        fresh = InlineCopy(tiny_tokenizer, words, TYPES, CopyAnswer(), opening=" ")
        assert reused.allowed(prefix, [stop]) == fresh.allowed(prefix, [stop]), prefix
