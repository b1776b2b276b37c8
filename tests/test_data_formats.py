import gzip
import json

import pytest

from tailorlm.data.formats import bio_entities
from tailorlm.data.sources import read_table
from tailorlm.errors import DataError
from conftest import write

WNUT_TYPES = {"person", "location", "group", "corporation", "product", "creative-work"}


# --- CoNLL ----------------------------------------------------------------------------------------------------

def test_conll_sentences_tags_and_entities(tmp_path):
    path = write(tmp_path / "ner.conll", "-DOCSTART- O\n\nEmpire\tB-location\nState\tI-location\nBuilding\tI-location\n"
                                         "is\tO\nnice\tO\n\n\nI\tO\nmet\tO\nJane\tB-person\n")
    table = read_table(str(path))
    assert [r.where for r in table.records] == ["line 3", "line 10"]
    first = table.records[0].fields
    assert first == {"tokens": ["Empire", "State", "Building", "is", "nice"], "tags": ["B-location", "I-location",
                     "I-location", "O", "O"], "text": "Empire State Building is nice",
                     "entities": [{"type": "location", "text": "Empire State Building"}]}
    assert table.records[1].fields["entities"] == [{"type": "person", "text": "Jane"}]


def test_conll_multi_column_spaces_and_suffixes(tmp_path):
    # CoNLL-2003 style: token POS chunk NER, space separated; the tag is the last column.
    text = "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n"
    for suffix in (".conll", ".bio", ".iob"):
        table = read_table(str(write(tmp_path / f"d{suffix}", text)))
        assert table.records[0].fields["tags"] == ["B-ORG", "O", "B-MISC"]
        assert table.records[0].fields["tokens"] == ["EU", "rejects", "German"]
    # an explicit format reads any extension; a tab-separated token may itself be a non-breaking space
    table = read_table(str(write(tmp_path / "d.txt", "a\tO\n\u00a0\tO\nb\tB-X\t\n")), "conll")
    assert table.records[0].fields["tokens"] == ["a", "\u00a0", "b"]


def test_bio_entities_follow_conlleval():
    tokens = ["a", "b", "c", "d", "e", "f"]
    # I-X after O or after another type starts a new span (IOB1 files read the same way); B-X always does.
    assert bio_entities(tokens, ["I-PER", "I-PER", "I-LOC", "B-LOC", "I-LOC", "O"]) == [
        {"type": "PER", "text": "a b"}, {"type": "LOC", "text": "c"}, {"type": "LOC", "text": "d e"}]
    assert bio_entities(tokens, ["O", "I-PER", "O", "I-PER", "B-PER", "B-PER"]) == [
        {"type": "PER", "text": "b"}, {"type": "PER", "text": "d"}, {"type": "PER", "text": "e"}, {"type": "PER", "text": "f"}]


@pytest.mark.parametrize("content, message", [
    ("a\tO\nb\n", "line 2: token 'b' has no tag; expected 'TOKEN<TAB>TAG' (the tag is the last column)"),
    ("a\tO\n\nb\tPER\n", "line 3: tag 'PER' of token 'b' is not O, B-TYPE or I-TYPE (only BIO/IOB2 tags are read)"),
    ("a\tS-PER\n", "line 1: tag 'S-PER' of token 'a' is not O, B-TYPE or I-TYPE (only BIO/IOB2 tags are read)"),
    ("a\tB-\n", "line 1: tag 'B-' of token 'a' is not O, B-TYPE or I-TYPE (only BIO/IOB2 tags are read)"),
    ("a\tO\n\tO\n", "line 2: empty token before the tag"),
])
def test_conll_errors_name_the_line(tmp_path, content, message):
    path = write(tmp_path / "bad.conll", content)
    with pytest.raises(DataError) as info:
        read_table(str(path))
    assert str(info.value) == f"{path}, {message}"


def test_conll_reads_real_wnut17(shared_data):
    table = read_table(str(shared_data / "wnut17" / "train.conll"))
    assert len(table.records) == 3394
    entities = [e for r in table.records for e in r.fields["entities"]]
    assert {e["type"] for e in entities} == WNUT_TYPES
    # one entity per B- tag in the file (660 B-person, ...), and every entity is a phrase of its sentence
    assert sum(e["type"] == "person" for e in entities) == 660
    assert all(e["text"] in r.fields["text"] for r in table.records for e in r.fields["entities"])
    assert table.records[0].where == "line 1"
    assert table.records[0].fields["entities"][0] == {"type": "location", "text": "Empire State Building"}


# --- Parallel -------------------------------------------------------------------------------------------------

def test_parallel_plain_and_gzip(tmp_path):
    src = write(tmp_path / "train.en", "A dog runs.\r\nTwo men\u2028talk.\n")  # U+2028 is not a line break here
    tgt = tmp_path / "train.de.gz"
    tgt.write_bytes(gzip.compress("Ein Hund rennt.\nZwei Männer reden.\n".encode()))
    table = read_table(f"{src}|{tgt}")
    assert table.path == f"{src}|{tgt}"
    assert [r.fields for r in table.records] == [{"source": "A dog runs.", "target": "Ein Hund rennt."},
                                                 {"source": "Two men\u2028talk.", "target": "Zwei Männer reden."}]
    assert [r.where for r in table.records] == ["line 1", "line 2"]
    assert read_table(f"{src} | {tgt}", "parallel").records[1].fields["target"] == "Zwei Männer reden."


@pytest.mark.parametrize("en, de, source, message", [
    ("a\nb\nc\n", "x\ny\n", "{d}/t.en|{d}/t.de", "{d}/t.en|{d}/t.de: unaligned: {d}/t.en has 3 lines, {d}/t.de has 2"),
    ("a\nb\n", "x\n \n", "{d}/t.en|{d}/t.de", "{d}/t.de, line 2: empty line; its pair in {d}/t.en is 'b'"),
    ("a\n\n", "x\ny\n", "{d}/t.en|{d}/t.de", "{d}/t.en, line 2: empty line; its pair in {d}/t.de is 'y'"),
    ("", "", "{d}/t.en|{d}/t.de", "{d}/t.en|{d}/t.de: no data rows (both files are empty)"),
    ("a\n", "x\n", "{d}/t.en", ("{d}/t.en: format parallel needs two line-aligned files joined by '|', "
                                "e.g. train.en|train.de")),
    ("a\n", "x\n", "{d}/t.en|{d}/nope.de", "{d}/nope.de: file not found"),
])
def test_parallel_errors(tmp_path, en, de, source, message):
    write(tmp_path / "t.en", en)
    write(tmp_path / "t.de", de)
    with pytest.raises(DataError) as info:
        read_table(source.format(d=tmp_path), "parallel")
    assert str(info.value) == message.format(d=tmp_path)


def test_parallel_reads_real_multi30k(shared_data):
    folder = shared_data / "multi30k"
    table = read_table(f"{folder / 'train.en.gz'}|{folder / 'train.de.gz'}")
    assert len(table.records) == 29000
    first = table.records[0].fields
    assert first["source"].startswith("Two young, White males") and first["target"].startswith("Zwei junge weiße Männer")
    assert table.records[-1].where == "line 29000"


# --- Chat -----------------------------------------------------------------------------------------------------

OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}], "id": 7}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                              {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}]}
ALPACA = {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen"}


def test_chat_shapes_are_normalised_to_openai_messages(tmp_path):
    path = write(tmp_path / "chat.jsonl", "\n".join(json.dumps(r) for r in (OPENAI, SHAREGPT, ALPACA)) + "\n")
    for fmt in ("auto", "chat"):
        records = read_table(str(path), fmt).records
        assert records[0].fields == {"messages": OPENAI["messages"]}
        assert records[1].fields["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                                 {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]
        assert records[2].fields == {**ALPACA, "messages": [
            {"role": "user", "content": "Translate to German.\n\nGood morning"}, {"role": "assistant", "content": "Guten Morgen"}]}
        assert [r.where for r in records] == ["line 1", "line 2", "line 3"]
    no_input = {"instruction": "Say hi.", "input": "", "output": "Hi"}
    records = read_table(str(write(tmp_path / "a.json", json.dumps([no_input, ALPACA]))), "chat").records
    assert records[0].fields["messages"][0] == {"role": "user", "content": "Say hi."}
    assert records[0].fields["input"] == "" and records[1].where == "record 2"


def test_flat_json_records_are_left_alone(tmp_path):
    flat = [{"text": "a", "label": "x", "messages": "three"}, {"instruction": "no output here", "label": "y"}]
    assert [r.fields for r in read_table(str(write(tmp_path / "f.json", json.dumps(flat)))).records] == flat
    jsonl = write(tmp_path / "f.jsonl", "\n".join(json.dumps(r) for r in flat))
    assert [r.fields for r in read_table(str(jsonl)).records] == flat


def _turns(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize("record, message", [
    (_turns(("user", "Hi"), ("bot", "Hello")),
     "messages turn 2: unknown role 'bot'; expected one of system, user, assistant, tool"),
    (_turns(("user", "Hi"), ("asistant", "Hello")),
     "messages turn 2: unknown role 'asistant' (did you mean 'assistant'?); expected one of system, user, assistant, tool"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}, "messages turn 2 (assistant): no 'content'"),
    (_turns(("user", ["Hi"]), ("assistant", "Hello")), "messages turn 1 (user): 'content' must be a string, found list"),
    ({"messages": [{"content": "Hi"}]}, "messages turn 1: no 'role'"),
    ({"messages": ["Hi"]}, "messages turn 1: expected an object with 'role' and 'content', found str"),
    (_turns(("system", "Be brief."), ("user", "Hi")), "no assistant turn: the conversation holds nothing for the model to learn"),
    (_turns(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")),
     "the last turn is 'user', not the assistant's: a conversation must end with the reply the model learns to give"),
    ({"messages": []}, "empty conversation ('messages' is an empty list)"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]},
     "conversations turn 2: unknown from 'assistant'; expected one of system, human, gpt, function_call, observation"),
    ({"conversations": [{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Hi"}]},
     "the last turn is 'human', not the assistant's: a conversation must end with the reply the model learns to give"),
    ({"instruction": "Say hi.", "output": 3}, "Alpaca 'output' must be a string, found int"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey", "weight": 2}]},
     "messages turn 2 (assistant): 'weight' must be 0 or 1, on assistant turns only (found 2)"),
    ({"messages": [{"role": "user", "content": "Hi", "weight": 0}, {"role": "assistant", "content": "Hey"}]},
     "messages turn 1 (user): 'weight' must be 0 or 1, on assistant turns only (found 0)"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{'x': 1}"}}]}]},
     "messages turn 2 (assistant): tool call 1 arguments is not valid JSON: Expecting property name enclosed in "
     "double quotes at character 1"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"arguments": "{}"}}]}]}, "messages turn 2 (assistant): tool call 1 needs 'function' with a 'name'"),
    ({"messages": [{"role": "user", "content": "Hi", "tool_calls": []}, {"role": "assistant", "content": "Hey"}]},
     "messages turn 1 (user): only assistant turns make tool calls"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": []}]},
     "messages turn 2 (assistant): 'tool_calls' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}], "tools": "[{"},
     "'tools' is not valid JSON: Expecting property name enclosed in double quotes at character 2"),
])
def test_chat_errors_name_the_line_or_record(tmp_path, record, message):
    path = write(tmp_path / "c.jsonl", json.dumps(OPENAI) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        read_table(str(path))
    assert str(info.value) == f"{path}, line 2: {message}"
    array = write(tmp_path / "c.json", json.dumps([OPENAI, OPENAI, record]))
    with pytest.raises(DataError) as info:
        read_table(str(array), "chat")
    assert str(info.value) == f"{array}, record 3: {message}"


def test_chat_format_requires_chat_records(tmp_path):
    path = write(tmp_path / "c.jsonl", json.dumps(OPENAI) + "\n" + '{"text": "a", "label": "x"}\n')
    with pytest.raises(DataError) as info:
        read_table(str(path), "chat")
    assert str(info.value) == (f"{path}, line 2: not a chat record: expected 'messages' (OpenAI), 'conversations' "
                               f"(ShareGPT) or 'instruction' and 'output' (Alpaca); found keys: text, label")
    with pytest.raises(DataError, match=r"line 1: 'messages' must be a list of turns, found str"):
        read_table(str(write(tmp_path / "s.jsonl", '{"messages": "Hi"}\n')), "chat")


def test_chat_reads_real_alpaca(shared_data):
    records = read_table(str(shared_data / "alpaca" / "alpaca_5000.json"), "chat").records
    assert len(records) == 5000
    first = records[0].fields
    assert first["messages"][0]["content"] == first["instruction"] + "\n\n" + first["input"]
    assert first["messages"][1] == {"role": "assistant", "content": first["output"]}
    # the file holds two records with an empty output: read as they are (an empty reply is not a format error)
    assert [r.where for r in records if not r.fields["output"]] == ["record 2336", "record 4659"]


def test_tool_calls_weights_and_tool_results_are_kept_as_chat_templates_read_them(tmp_path):
    """OpenAI's fine-tuning records (arguments as a JSON string, per-message weight) and LLaMA-Factory's ShareGPT
    tool turns (function_call, observation, tools as a JSON string) both read to the same messages."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    openai = {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "weight": 1, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "rain", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Rain.", "weight": 0}]}
    sharegpt = {"tools": json.dumps(tools), "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": "rain"}, {"from": "gpt", "value": "Rain."}]}
    path = write(tmp_path / "t.jsonl", json.dumps(openai) + "\n" + json.dumps(sharegpt) + "\n")
    first, second = (r.fields for r in read_table(str(path)).records)
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    assert first == {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call], "weight": 1},
        {"role": "tool", "content": "rain", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Rain.", "weight": 0}]}
    assert second == {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain."}]}


def test_keys_a_column_of_turns_fills_with_none_parallel_calls_and_sharegpts_system(tmp_path):
    """Parquet and Arrow fill every key a turn lacks with None; LLaMA-Factory writes parallel calls as a JSON
    list and the system prompt as a top-level key."""
    from tailorlm.data.formats import chat_fields

    arrow = {"messages": [{"role": "user", "content": "Hi", "weight": None, "tool_calls": None, "name": None},
                          {"role": "assistant", "content": None, "weight": 1, "name": None, "tool_calls": [
                              {"type": "function", "function": {"name": "f", "arguments": None}}]}]}
    assert chat_fields(arrow, tmp_path, "row 1", True)["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "weight": 1,
         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]
    sharegpt = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Oslo and Bergen?"},
        {"from": "function_call", "value": '[{"name": "w", "arguments": {"city": "Oslo"}}, '
                                           '{"name": "w", "arguments": {"city": "Bergen"}}]'},
        {"from": "observation", "value": "rain, sun"}, {"from": "gpt", "value": "Rain, then sun."}]}
    messages = chat_fields(sharegpt, tmp_path, "line 1", True)["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert [c["function"]["arguments"]["city"] for c in messages[2]["tool_calls"]] == ["Oslo", "Bergen"]
