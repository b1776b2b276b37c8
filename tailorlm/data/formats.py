"""Readers for structured task data: CoNLL token/tag files (NER), line-aligned parallel text (translation), and
chat conversations in the OpenAI, ShareGPT and Alpaca shapes.

Like the readers in tabular.py, each returns clean records or raises DataError naming the file, the line or
record, and the problem. Which reader reads a file is decided in sources.py; chat_fields is also used by the
JSON readers, which recognise chat-shaped records.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tailorlm.data.records import PAIR_SEPARATOR, Record, Table, check_file, numbered_lines, read_text
from tailorlm.errors import DataError, did_you_mean

DOCSTART = "-DOCSTART-"  # CoNLL-2003 document marker, not a token

OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# LLaMA-Factory's ShareGPT spelling of tool use: a `function_call` turn holds the call as JSON, `observation`
# its result.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "function_call": "assistant",
                  "observation": "tool"}


# --- CoNLL ----------------------------------------------------------------------------------------------------

def read_conll(path: Path) -> list[Record]:
    """One record per sentence: tokens, tags, text (tokens joined by spaces) and BIO entity spans."""
    records: list[Record] = []
    tokens: list[str] = []
    tags: list[str] = []
    first_line = 0

    def end_sentence():
        if tokens:
            records.append(Record({"tokens": list(tokens), "tags": list(tags), "text": " ".join(tokens),
                                   "entities": bio_entities(tokens, tags)}, f"line {first_line}"))
            tokens.clear()
            tags.clear()

    for number, line in numbered_lines(path, read_text(path)):
        if not line.strip():
            end_sentence()
            continue
        # Tabs, when present, are the only separator: a token may itself be a non-breaking space or similar.
        columns = line.split("\t") if "\t" in line else line.split()
        while len(columns) > 1 and not columns[-1].strip():  # trailing tabs
            columns.pop()
        token = columns[0]
        if token == DOCSTART:
            end_sentence()
            continue
        if not token:
            raise DataError(path, f"line {number}", "empty token before the tag")
        if len(columns) == 1:
            raise DataError(path, f"line {number}", f"token '{token}' has no tag; expected 'TOKEN<TAB>TAG' "
                                                    f"(the tag is the last column)")
        tag = columns[-1].strip()
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise DataError(path, f"line {number}", f"tag '{tag}' of token '{token}' is not O, B-TYPE or I-TYPE "
                                                    f"(only BIO/IOB2 tags are read)")
        if not tokens:
            first_line = number
        tokens.append(token)
        tags.append(tag)
    end_sentence()
    return records


def bio_entities(tokens: list[str], tags: list[str]) -> list[dict[str, str]]:
    """Entity spans from BIO/IOB2 tags; an I-X that does not continue an X span starts one, as conlleval does."""
    spans: list[tuple[str, list[str]]] = []
    current: tuple[str, list[str]] | None = None
    for token, tag in zip(tokens, tags):
        if tag == "O":
            current = None
            continue
        prefix, kind = tag[0], tag[2:]
        if prefix == "I" and current is not None and current[0] == kind:
            current[1].append(token)
        else:
            current = (kind, [token])
            spans.append(current)
    return [{"type": kind, "text": " ".join(words)} for kind, words in spans]


# --- Parallel text --------------------------------------------------------------------------------------------

def read_parallel(source: str) -> Table:
    """'SOURCE|TARGET': two line-aligned files (plain or gzip), one record per line pair."""
    parts = [p.strip() for p in source.split(PAIR_SEPARATOR)]
    if len(parts) != 2 or not all(parts):
        raise DataError(source, None, f"format parallel needs two line-aligned files joined by "
                                      f"'{PAIR_SEPARATOR}', e.g. train.en{PAIR_SEPARATOR}train.de")
    paths = [Path(p) for p in parts]
    sides = []
    for path in paths:
        check_file(path)
        sides.append([line for _, line in numbered_lines(path, read_text(path))])
    name = f"{paths[0]}{PAIR_SEPARATOR}{paths[1]}"
    if len(sides[0]) != len(sides[1]):
        # Line N must translate line N: one missing line shifts every later pair, so nothing is read.
        raise DataError(name, None, f"unaligned: {paths[0]} has {len(sides[0]):,} lines, "
                                    f"{paths[1]} has {len(sides[1]):,}")
    records = []
    for number, pair in enumerate(zip(*sides), start=1):
        for side in (0, 1):
            if not pair[side].strip():
                raise DataError(paths[side], f"line {number}", f"empty line; its pair in {paths[1 - side]} is "
                                                               f"{_clip(pair[1 - side])!r}")
        records.append(Record({"source": pair[0].strip(), "target": pair[1].strip()}, f"line {number}"))
    if not records:
        raise DataError(name, None, "no data rows (both files are empty)")
    return Table(name, records)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- Chat -----------------------------------------------------------------------------------------------------

def chat_fields(obj: dict[str, Any], path: Path, where: str, required: bool) -> dict[str, Any] | None:
    """{'messages': [...]} for a chat-shaped JSON record, None for a flat one (an error instead when required).

    OpenAI records are recognised by a 'messages' list, ShareGPT by 'conversations', Alpaca by 'instruction'
    with 'output'; other keys are flat columns, which the plain JSON readers have always returned as they are.
    """
    if isinstance(obj.get("messages"), list) or (required and "messages" in obj):
        return {"messages": _turns(obj["messages"], "messages", "role", "content", OPENAI_ROLES, path, where),
                **_tools(obj, path, where)}
    if isinstance(obj.get("conversations"), list) or (required and "conversations" in obj):
        messages = _turns(obj["conversations"], "conversations", "from", "value", SHAREGPT_ROLES, path, where)
        if isinstance(obj.get("system"), str) and obj["system"] and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": obj["system"]}] + messages  # LLaMA-Factory's system key
        return {"messages": messages, **_tools(obj, path, where)}
    if "instruction" in obj and "output" in obj:
        return _alpaca(obj, path, where)
    if required:
        raise DataError(path, where, "not a chat record: expected 'messages' (OpenAI), 'conversations' (ShareGPT) "
                                     f"or 'instruction' and 'output' (Alpaca); found keys: {', '.join(obj) or 'none'}")
    return None


def _turns(turns: Any, key: str, role_key: str, text_key: str, roles: dict[str, str], path: Path,
           where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise DataError(path, where, f"'{key}' must be a list of turns, found {type(turns).__name__}")
    if not turns:
        raise DataError(path, where, f"empty conversation ('{key}' is an empty list)")
    messages = []
    for i, turn in enumerate(turns, start=1):
        label = f"{key} turn {i}"
        if not isinstance(turn, dict):
            raise DataError(path, where, f"{label}: expected an object with '{role_key}' and '{text_key}', "
                                         f"found {type(turn).__name__}")
        if role_key not in turn:
            raise DataError(path, where, f"{label}: no '{role_key}'")
        role = turn[role_key]
        if role not in roles:
            raise DataError(path, where, f"{label}: unknown {role_key} {role!r}{did_you_mean(str(role), roles)}; "
                                         f"expected one of {', '.join(roles)}")
        content = turn.get(text_key)
        calls = turn.get("tool_calls")
        if role == "function_call":  # ShareGPT: the value is the call itself, or a list of parallel calls
            value = _json_value(content, f"{label} ({role})", path, where)
            calls, content = [{"function": v} for v in (value if isinstance(value, list) else [value])], ""
        if content is None and calls is None:
            raise DataError(path, where, f"{label} ({role}): no '{text_key}'")
        if content is not None and not isinstance(content, str):
            raise DataError(path, where, f"{label} ({role}): '{text_key}' must be a string, "
                                         f"found {type(content).__name__}")
        message = {"role": roles[role], "content": content or ""}
        if calls is not None:
            if message["role"] != "assistant":
                raise DataError(path, where, f"{label} ({role}): only assistant turns make tool calls")
            message["tool_calls"] = _tool_calls(calls, f"{label} ({role})", path, where)
        if turn.get("weight") is not None:  # OpenAI's per-message switch: 0 = this reply carries no loss
            # (None: a Parquet or Arrow column of turns fills the keys a turn lacks with None)
            if message["role"] != "assistant" or turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
                raise DataError(path, where, f"{label} ({role}): 'weight' must be 0 or 1, on assistant turns only "
                                             f"(found {turn['weight']!r})")
            message["weight"] = turn["weight"]
        for extra in ("name", "tool_call_id"):
            if isinstance(turn.get(extra), str) and message["role"] == "tool":
                message[extra] = turn[extra]
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(path, where, "no assistant turn: the conversation holds nothing for the model to learn")
    if messages[-1]["role"] != "assistant":
        last = turns[-1][role_key]
        raise DataError(path, where, f"the last turn is {last!r}, not the assistant's: a conversation must end "
                                     f"with the reply the model learns to give")
    return messages


def _tool_calls(calls: Any, label: str, path: Path, where: str) -> list[dict]:
    """OpenAI tool calls as chat templates read them: {'type': 'function', 'function': {'name', 'arguments'}},
    the arguments as an object (OpenAI's files hold them as a JSON string; templates write them with tojson)."""
    if not isinstance(calls, list) or not calls:
        raise DataError(path, where, f"{label}: 'tool_calls' must be a non-empty list")
    out = []
    for n, call in enumerate(calls, start=1):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(path, where, f"{label}: tool call {n} needs 'function' with a 'name'")
        arguments = function.get("arguments")
        arguments = {} if arguments is None else arguments
        if isinstance(arguments, str):
            arguments = _json_value(arguments, f"{label}: tool call {n} arguments", path, where)
        if not isinstance(arguments, dict):
            raise DataError(path, where, f"{label}: tool call {n} arguments must be an object")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _tools(obj: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    """{'tools': [...]} when the record declares tool schemas (a list, or ShareGPT's JSON string of one)."""
    tools = obj.get("tools")
    if tools in (None, "", []):
        return {}
    if isinstance(tools, str):
        tools = _json_value(tools, "'tools'", path, where)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(path, where, "'tools' must be a list of tool schemas (objects)")
    return {"tools": tools}


def _json_value(text: Any, what: str, path: Path, where: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, where, f"{what} is not valid JSON: {e.msg} at character {e.pos}") from None


def _alpaca(obj: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    for key in ("instruction", "input", "output"):
        value = obj.get(key)
        if key in obj and not isinstance(value, str) and not (key == "input" and value is None):
            raise DataError(path, where, f"Alpaca '{key}' must be a string, found {type(value).__name__}")
    extra = obj.get("input") or ""
    user = obj["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    return {**obj, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]}
