"""Task metrics on generated text: every expected figure is worked out by hand in the test or its comment."""
from __future__ import annotations

import json

import pytest

from tailorlm.tasks.instruction import rouge_l
from tailorlm.tasks.math_problems import final_number, gsm8k_answer, math_scores
from tailorlm.tasks.ner import entity_scores, format_entities, parse_entities
from tailorlm.tasks.qa import qa_scores
from tailorlm.tasks.translation import translation_scores

TYPES = ["person", "location", "organization"]


# ---- entities -------------------------------------------------------------------------------------------

def test_format_entities_keeps_order_and_duplicates():
    entities = [{"type": "person", "text": "John Smith"}, {"type": "location", "text": "Paris"},
                {"type": "person", "text": "John Smith"}]
    assert format_entities(entities) == "person: John Smith; location: Paris; person: John Smith"
    assert format_entities([]) == "none"


def test_parse_inverts_format():
    entities = [{"type": "location", "text": "New York"}, {"type": "person", "text": "Ada Lovelace"},
                {"type": "location", "text": "New York"}]
    parsed = parse_entities(format_entities(entities), TYPES)
    assert parsed == [("location", "New York"), ("person", "Ada Lovelace"), ("location", "New York")]
    assert parse_entities(format_entities([]), TYPES) == []


def test_parse_messy_generation():
    text = ("Person :  John   Smith\n"
            "LOCATION: Paris;  food: pizza ; organization: Acme Corp.\n"
            "- person: Mary: Queen of Scots\n"
            "here are the entities")
    assert parse_entities(text, TYPES) == [
        ("person", "John Smith"),            # spaces around ':' and inside the span collapsed
        ("location", "Paris"),               # type case mapped onto the canonical type
        ("organization", "Acme Corp"),       # trailing period stripped; 'food' is not a type and is dropped
        ("person", "Mary: Queen of Scots"),  # split on the first ':' only; the bullet is not part of the type
    ]
    assert parse_entities("None.", TYPES) == []
    assert parse_entities("  ", TYPES) == []


def test_parse_maps_type_to_the_given_spelling():
    assert parse_entities("per: Ann; loc: Rome", ["PER", "LOC"]) == [("PER", "Ann"), ("LOC", "Rome")]


def test_entity_scores_hand_computed():
    gold = [[("person", "John Smith"), ("location", "Paris")], [("organization", "Acme")]]
    pred = [[("person", "john smith"), ("person", "Paris")], []]  # one right (case ignored), one wrong type
    scores = entity_scores(pred, gold)
    # 1 correct of 2 predicted and 3 gold: P = 1/2, R = 1/3, F1 = 2 * (1/6) / (5/6) = 0.4
    assert (scores["predicted"], scores["gold"], scores["correct"]) == (2, 3, 1)
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.4)


def test_entity_scores_count_duplicates_as_a_multiset():
    gold = [[("location", "Paris"), ("location", "Paris")]]
    pred = [[("location", "Paris"), ("location", "Paris"), ("location", "Paris")]]
    scores = entity_scores(pred, gold)
    # Only two of the three predicted copies have a gold partner: P = 2/3, R = 1, F1 = 0.8
    assert scores["correct"] == 2
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(0.8)


def test_entity_scores_gold_with_trailing_period_matches_parsed_span():
    gold = [[("location", "U.S.")]]
    pred = [parse_entities("location: U.S.", TYPES)]
    assert entity_scores(pred, gold)["f1"] == pytest.approx(1.0)


def test_entity_scores_zero_denominators_are_zero():
    scores = entity_scores([[], []], [[], []])
    assert scores == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "predicted": 0, "gold": 0, "correct": 0}
    with pytest.raises(ValueError):
        entity_scores([[]], [[], []])


# ---- question answering ---------------------------------------------------------------------------------

def test_qa_normalisation_gives_exact_match():
    scores = qa_scores(["The Eiffel Tower."], [["eiffel tower"]])
    assert scores == {"exact_match": 1.0, "token_f1": 1.0}


def test_qa_token_f1_partial_overlap():
    # normalised: [big, red, barn] vs [red, barn]: 2 shared, P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 0.8
    scores = qa_scores(["a big red barn"], [["the red barn"]])
    assert scores["exact_match"] == 0.0
    assert scores["token_f1"] == pytest.approx(0.8)


def test_qa_takes_best_reference_and_averages_examples():
    preds = ["Paris", "blue whale", "nothing"]
    refs = [["London", "paris"], ["the whale", "a shark"], ["something"]]
    scores = qa_scores(preds, refs)
    # EM: 1, 0, 0 -> 1/3. F1: 1; [blue, whale] vs [whale]: P = 1/2, R = 1, F1 = 2/3; 0 -> (1 + 2/3) / 3 = 5/9
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["token_f1"] == pytest.approx(5 / 9)


# ---- translation ----------------------------------------------------------------------------------------

def test_translation_identical_is_100():
    sents = ["the cat sat on the mat .", "a quick brown fox jumps over the lazy dog ."]
    scores = translation_scores(sents, sents)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)


def test_translation_unrelated_is_near_zero():
    scores = translation_scores(["xyz qqq vvv kkk"], ["the cat sat on the mat"])
    assert scores["bleu"] < 5
    assert scores["chrf"] < 5


def test_translation_partial_bleu_by_hand():
    pred = ["the quick brown fox jumps over the lazy dog"]
    ref = ["the quick brown fox leaps over the lazy dog"]
    scores = translation_scores(pred, ref)
    # Same length, so no brevity penalty. n-gram precisions: 8/9, 6/8, 4/7, 2/6;
    # BLEU = 100 * (8*6*4*2 / (9*8*7*6)) ** (1/4) = 100 * (384/3024) ** 0.25 = 59.69
    assert scores["bleu"] == pytest.approx(59.69, abs=0.01)
    assert 0 < scores["chrf"] < 100


# ---- math -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("-3", "-3"),
    ("3.50", "3.5"),
    ("1,000", "1000"),
    ("7.0", "7"),
    ("It costs $12.", "12"),
    ("The answer is 18.", "18"),
    ("First 4, then 5, so 1,250 in total.", "1250"),
    ("a 120-page book", "120"),
    ("The change is -0.0 degrees", "0"),
    ("no number", None),
    ("", None),
])
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_gsm8k_answer_reads_the_marker():
    assert gsm8k_answer("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,200") == "1200"
    assert gsm8k_answer("so the loss is #### -12") == "-12"
    assert gsm8k_answer("no marker, the result is 42.") == "42"


def test_gsm8k_answer_on_real_rows(shared_data):
    path = shared_data / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:50]]
    assert rows[0]["answer"].endswith("#### 72")
    assert gsm8k_answer(rows[0]["answer"]) == "72"
    for row in rows:
        # The marker line of the real data holds a bare integer, possibly with thousands commas.
        expected = row["answer"].split("####")[-1].strip().replace(",", "")
        assert gsm8k_answer(row["answer"]) == expected
        # A model that copies the reference solution scores an exact match.
        assert math_scores([row["answer"]], [row["answer"]])["exact_match"] == 1.0


def test_math_scores_hand_computed():
    preds = ["So she sells 72 clips.", "The answer is $10.00", "I am not sure", "The total is 1,201"]
    refs = ["... #### 72", "#### 10", "#### 5", "#### 1,200"]
    scores = math_scores(preds, refs)
    # right, right (10.00 -> 10), no number, wrong: EM 2/4, answered 3/4
    assert scores == {"exact_match": 0.5, "answered": 0.75}


# ---- ROUGE-L --------------------------------------------------------------------------------------------

def test_rouge_l_bounds_and_partial():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"])["rouge_l"] == pytest.approx(1.0)
    assert rouge_l(["dogs bark loudly"], ["the cat sat"])["rouge_l"] == pytest.approx(0.0)
    # LCS of [the cat sat on the mat] and [the cat is on the mat] is 'the cat on the mat' = 5 of 6 tokens
    # each side: P = R = F = 5/6. Averaged with an identical pair: (5/6 + 1) / 2 = 11/12
    scores = rouge_l(["the cat sat on the mat", "hello world"], ["the cat is on the mat", "hello world"])
    assert scores["rouge_l"] == pytest.approx(11 / 12)


def test_empty_inputs_score_zero():
    assert translation_scores([], []) == {"bleu": 0.0, "chrf": 0.0}
    assert rouge_l([], []) == {"rouge_l": 0.0}
    assert qa_scores([], []) == {"exact_match": 0.0, "token_f1": 0.0}
    assert math_scores([], []) == {"exact_match": 0.0, "answered": 0.0}
