"""response_format's JSON recognizer (serve/json_constraint.py) on its own: which texts it takes, which it refuses,
the token masks it builds from a real vocabulary, and random walks through those masks that must end in JSON
matching the schema. The served answers are tested through the HTTP API in test_serve_server.py."""
import json
import random

import pytest
import torch

from conftest import build_tiny_tokenizer
from tailorlm.serve.json_constraint import (JsonConstraint, JsonVocabulary, SchemaError, advance, can_end,
                                            compile_response_format, start)
from tailorlm.serve.logprobs import TokenTable

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "mood": {"enum": ["calm", "cross", 7, None]},
                         "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 2},
                         "pet": {"type": ["boolean", "null"]}}}
# Every value bounded (no free strings, arrays capped, numbers at most 16 digits a part): any walk completes.
BOUNDED = {"type": "object", "required": ["label", "score", "count"],
           "properties": {"label": {"enum": ["positive", "negative"]}, "score": {"type": "number"},
                          "count": {"type": "integer"}, "ok": {"type": ["boolean", "null"]},
                          "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}


def schema(definition: dict):
    return compile_response_format("json_schema", definition)


def reads(node, text: str) -> bool:
    """Whether text is a whole document the recognizer takes."""
    state = advance(start(node), text)
    return state is not None and can_end(state)


VALID = ['{"name":"Ann","age":41}', '{"age":-3,"name":"B\\u00e9\\n\\"x\\""}', '{"name":"","age":0,"mood":7}',
         '{"name":"x","age":5,"scores":[1.5e-3],"pet":null,"mood":null}', '{"pet":true,"age":1,"name":"y"}',
         '{"name":"x","age":12,"scores":[0,-0.25E+12],"mood":"calm"}']
INVALID = ['{"name":"Ann"}', '{"age":1}', '{"name":"a","age":1,"name":"b"}', '{"name":"a","age":1,"other":1}',
           '{"name":"a", "age":1}', '{"name":"a","age":1.5}', '{"name":"a","age":01}', '{"name":"a","age":1,}',
           '{"name":"a","age":1,"mood":"glad"}', '{"name":"a","age":1,"scores":[]}',
           '{"name":"a","age":1,"scores":[1,2,3]}',
           '{"name":"a\nb","age":1}', '{"name":"\\x","age":1}', '{"name":"\\u12g4","age":1}', '{"name":1,"age":1}',
           '{"name":"a","age":1,"pet":"no"}', '{"name":"a","age":1}x', '[]', '"text"', '{"name":"a","age":-}',
           '{"name":"a","age":12345678901234567}']


@pytest.mark.parametrize("text", VALID)
def test_documents_matching_the_schema_are_read_to_their_end(text):
    assert reads(schema(PERSON), text)
    json.loads(text)  # and they are JSON


@pytest.mark.parametrize("text", INVALID)
def test_anything_else_is_refused_at_the_character_that_breaks_it(text):
    assert not reads(schema(PERSON), text)


def test_a_number_or_literal_at_the_top_ends_only_where_it_may():
    number = schema({"type": "number"})
    assert advance(start(number), "12.") is not None and not can_end(advance(start(number), "12."))
    assert reads(number, "12.5") and reads(number, "-0") and not reads(number, "1e") and not reads(number, "--1")
    assert reads(number, "1234567890123456.1234567890123456e-123") and not reads(number, "1e1234")
    assert reads(schema({"enum": [1, 12]}), "1") and reads(schema({"enum": [1, 12]}), "12")
    assert not reads(schema({"enum": [1, 12]}), "123") and not reads(schema({"const": True}), "false")
    free = compile_response_format("json_object")
    assert reads(free, "{}") and not reads(free, "[]")
    assert reads(free, '{"a":[1,{"b":null}],"a":"dup","c":{"d":[]}}')  # any keys, any values
    assert reads(schema({}), '"any value"') and reads(schema({}), "[true,{}]")
    assert compile_response_format("text") is None


SCHEMA_ERRORS = [
    ({"type": "string", "pattern": "^a"},
     "the schema keyword 'pattern' at schema is not supported; this server enforces type, properties, required, "
     "additionalProperties, items, minItems, maxItems, enum, const (and accepts title, description, default, "
     "examples, $schema, $comment as annotations)"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}},
     "the schema keyword 'anyOf' at schema.properties.a is not supported; this server enforces type, properties, "
     "required, additionalProperties, items, minItems, maxItems, enum, const (and accepts title, description, "
     "default, examples, $schema, $comment as annotations)"),
    ({"type": "date"}, "schema.type must be one of object, array, string, number, integer, boolean, null "
                       "(or a list of them), not 'date'"),
    ({"properties": {"a": {}}, "required": ["b"]}, "schema.required names 'b', which is not in schema.properties"),
    ({"type": "integer", "enum": [1, 2.5]}, "schema: the value 2.5 is not of the schema's type (integer)"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "schema: minItems (3) is more than maxItems (2)"),
    ({"type": "array", "maxItems": -1}, "schema.maxItems must be a non-negative integer"),
    ({"type": "object", "additionalProperties": {"type": "string"}},
     "schema.additionalProperties must be true or false (a schema for it is not supported)"),
    ({"enum": []}, "schema.enum must be a non-empty list of values"),
    ({"type": "array", "items": "string"}, "schema.items must be a JSON object (a schema), not str"),
]


@pytest.mark.parametrize("definition,message", SCHEMA_ERRORS, ids=[m[:30] for _, m in SCHEMA_ERRORS])
def test_a_schema_outside_the_enforced_subset_is_refused_with_its_place(definition, message):
    with pytest.raises(SchemaError) as caught:
        schema(definition)
    assert str(caught.value) == message


@pytest.fixture(scope="module")
def vocabulary():
    tokenizer = build_tiny_tokenizer()
    table = TokenTable(tokenizer, len(tokenizer))
    return JsonVocabulary(table.texts, table.special, [tokenizer.eos_token_id])


def test_each_mask_holds_exactly_the_tokens_that_keep_the_document_valid(vocabulary):
    """The masks take shortcuts (tokens grouped by first character; inside a string, tokens without a quote or a
    backslash pass unread); they must equal reading every token in full."""
    node = schema(PERSON)
    for prefix in ["", "{", '{"', '{"na', '{"name":"ab', '{"name":"a\\', '{"name":"a","age":1', '{"age":4,"name":"x"',
                   '{"age":4,"scores":[', '{"age":4,"scores":[1,', '{"age":4,"mood":"c']:
        state = advance(start(node), prefix)
        expected = {t for t, text in enumerate(vocabulary.texts) if text and advance(state, text) is not None}
        if can_end(state):
            expected |= set(vocabulary.end_ids)
        assert set(torch.nonzero(vocabulary.allowed(state)).flatten().tolist()) == expected, prefix
        assert expected  # a document never reaches a state without a way on


def valid_bounded(document: dict) -> bool:
    properties = BOUNDED["properties"]
    return (set(BOUNDED["required"]) <= set(document) <= set(properties)
            and document["label"] in ("positive", "negative") and type(document["score"]) in (int, float)
            and type(document["count"]) is int and document.get("ok", None) in (True, False, None)
            and all(type(f) is bool for f in document.get("flags", [])) and len(document.get("flags", [])) <= 3)


def test_random_walks_through_the_masks_end_in_documents_matching_the_schema(vocabulary):
    rng, seen = random.Random(5), set()
    for _ in range(40):
        constraint, generated = JsonConstraint(schema(BOUNDED), vocabulary), []
        while not constraint.complete and len(generated) < 400:
            allowed = torch.nonzero(constraint.vocabulary.allowed(constraint.state)).flatten().tolist()
            generated.append(rng.choice(allowed))
            constraint.catch_up(torch.tensor(generated))
        assert constraint.complete  # bounded values: every walk closes its object within 400 tokens
        text = "".join(vocabulary.texts[t] for t in generated)
        assert valid_bounded(json.loads(text)), text
        seen.add(text)
    assert len(seen) == 40  # the walks took different ways: the masks allow more than one document


def test_greedy_requests_with_logprobs_or_a_schema_batch_with_others_and_answer_as_alone(tmp_path_factory,
                                                                                         tiny_tokenizer):
    """The log-probabilities and masks are kept row by row, so such requests join a batch of plain ones, and
    each answer (its text, its log-probabilities) is the one it gets alone."""
    import threading

    from test_serve_chat import serve_run
    from tailorlm.models.trained import load_trained
    from tailorlm.serve.engine import Engine, Sampling

    trained = load_trained(serve_run(tmp_path_factory, tiny_tokenizer), merge=True)
    engine = Engine(trained.model, trained.tokenizer, trained.chat_format(), "cpu")
    prompts = [engine.chat_prompt([{"role": "user", "content": text}])
               for text in ("hello", "the market rose", "the film won", "the team won the match")]
    settings = [Sampling(6), Sampling(9, logprobs=2), Sampling(120, json_format=schema(BOUNDED)),
                Sampling(5, logprobs=0, json_format=compile_response_format("json_object"))]
    entered, gate, generate = threading.Event(), threading.Event(), trained.model.generate

    def gated_generate(*args, **kwargs):  # hold the first generation until the others are queued
        entered.set()
        gate.wait(10)
        return generate(*args, **kwargs)

    try:
        alone = [engine.complete(p, s) for p, s in zip(prompts, settings)]
        trained.model.generate = gated_generate
        engine.submit(prompts[0], Sampling(1))
        assert entered.wait(10)
        futures = [engine.submit(p, s) for p, s in zip(prompts, settings)]
        gate.set()
        together = [f.result(30) for f in futures]
    finally:
        del trained.model.generate
        engine.close()
    assert engine.batch_sizes[-2:] == [1, 4]  # the held request, then the four in one batch
    assert [c.text for c in together] == [c.text for c in alone]
    assert json.loads(together[2].text)["label"] in ("positive", "negative") and together[3].text == "{}"
    assert together[0].logprobs is None and [len(c.logprobs) for c in together[1:] if c.logprobs] == [9, 2]
    for batched, single in zip(together[1::2], alone[1::2]):
        assert [t.token for t in batched.logprobs] == [t.token for t in single.logprobs]
        assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(batched.logprobs, single.logprobs))
