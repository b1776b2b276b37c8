"""response_format for the PyTorch engine: decoding constrained so that the answer is JSON, matching a schema.

A schema is compiled to a tree of Nodes (compile_response_format), refusing any keyword outside the subset this
decoder enforces: a keyword it ignored would give answers that break the client's schema. At each decode step a
character-level pushdown recognizer (advance) tells which tokens may come next, and every other token's logit
becomes -inf, so greedy and sampled answers alike are valid JSON once the document closes.

The JSON is compact: no whitespace between tokens (inside strings anything goes), so a model cannot pad an
answer with blanks until max_tokens runs out. Object keys are the declared properties, each at most once and
in any order, and the object closes only once every required key is in; a schema without properties allows any
keys. Keys and enum values are written as json.dumps writes them with ensure_ascii, so every one of them can be
spelled with ASCII tokens, which every vocabulary has.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
KEYWORDS = ("type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
            "const")
ANNOTATIONS = ("title", "description", "default", "examples", "$schema", "$comment")  # they constrain nothing
MASKS_KEPT = 256  # allowed-token masks cached per state (each one byte per vocabulary entry)


class SchemaError(ValueError):
    """A response_format this decoder cannot enforce exactly; the message says what and where."""


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: recognizer states hold nodes
class Node:
    types: frozenset
    literals: tuple | None = None  # enum or const: the only texts allowed, as compact JSON
    properties: dict | None = None  # declared keys (name -> Node); None: any keys, any values
    required: frozenset = frozenset()
    items: "Node | None" = None  # None: any values
    min_items: int = 0
    max_items: int | None = None
    key_texts: dict = field(default_factory=dict)  # each declared key as written (a JSON string) -> its name


ANY = Node(frozenset(TYPES))
ANY_OBJECT = Node(frozenset({"object"}))


def compile_response_format(kind: str, schema: dict | None = None) -> Node | None:
    """The root Node for OpenAI's response_format type ('text': None, no constraint)."""
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    return compile_schema({} if schema is None else schema, "schema")


def compile_schema(schema, where: str) -> Node:
    if not isinstance(schema, dict):
        raise SchemaError(f"{where} must be a JSON object (a schema), not {type(schema).__name__}")
    unknown = [k for k in schema if k not in KEYWORDS and k not in ANNOTATIONS]
    if unknown:
        raise SchemaError(f"the schema keyword '{unknown[0]}' at {where} is not supported; this server enforces "
                          f"{', '.join(KEYWORDS)} (and accepts {', '.join(ANNOTATIONS)} as annotations)")
    types = _types(schema, where)
    literals = _literals(schema, types, where)
    properties, key_texts, required = _properties(schema, where)
    if properties is None and schema.get("additionalProperties") is False:
        properties = {}  # no declared keys and no others: only {}
    items = compile_schema(schema["items"], f"{where}.items") if "items" in schema else None
    min_items, max_items = (_count(schema, k, where) for k in ("minItems", "maxItems"))
    if min_items is not None and max_items is not None and min_items > max_items:
        raise SchemaError(f"{where}: minItems ({min_items}) is more than maxItems ({max_items})")
    return Node(types, literals, properties, required, items, min_items or 0, max_items, key_texts)


def _types(schema: dict, where: str) -> frozenset:
    named = schema.get("type")
    if named is None:  # inferred from the keywords that only make sense for one type
        if any(k in schema for k in ("properties", "required", "additionalProperties")):
            return frozenset({"object"})
        return frozenset({"array"}) if any(k in schema for k in ("items", "minItems", "maxItems")) else ANY.types
    names = [named] if isinstance(named, str) else named
    if not isinstance(names, list) or not names or any(n not in TYPES for n in names):
        raise SchemaError(f"{where}.type must be one of {', '.join(TYPES)} (or a list of them), not {named!r}")
    return frozenset(names)


def _literals(schema: dict, types: frozenset, where: str) -> tuple | None:
    if "enum" in schema and "const" in schema:
        raise SchemaError(f"{where}: give enum or const, not both")
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if values is None:
        return None
    if not isinstance(values, list) or not values:
        raise SchemaError(f"{where}.enum must be a non-empty list of values")
    for value in values:
        if _json_type(value) not in types and not (_json_type(value) == "integer" and "number" in types):
            raise SchemaError(f"{where}: the value {json.dumps(value)} is not of the schema's type "
                              f"({', '.join(sorted(types))})")
    return tuple(dict.fromkeys(json.dumps(v, separators=(",", ":")) for v in values))


def _properties(schema: dict, where: str) -> tuple[dict | None, dict, frozenset]:
    declared = schema.get("properties")
    if declared is not None and not isinstance(declared, dict):
        raise SchemaError(f"{where}.properties must be an object mapping names to schemas")
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, bool):
        raise SchemaError(f"{where}.additionalProperties must be true or false (a schema for it is not supported)")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError(f"{where}.required must be a list of property names")
    missing = [r for r in required if declared is None or r not in declared]
    if missing:
        raise SchemaError(f"{where}.required names '{missing[0]}', which is not in {where}.properties")
    if declared is None:
        return None, {}, frozenset()
    properties = {name: compile_schema(sub, f"{where}.properties.{name}") for name, sub in declared.items()}
    return properties, {json.dumps(name): name for name in properties}, frozenset(required)


def _count(schema: dict, key: str, where: str) -> int | None:
    value = schema.get(key)
    if value is not None and (type(value) is not int or value < 0):
        raise SchemaError(f"{where}.{key} must be a non-negative integer")
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    kinds = {int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), "unknown")


# ---- the recognizer --------------------------------------------------------------------------------------------
# A state is a tuple of frames, innermost last; each frame is a tuple, so states hash and masks can be cached:
#   ("value", node)                         a value of node's schema starts here
#   ("lit", texts, position)                part way through one of a few literal texts (true, an enum value, ...)
#   ("str", escape)                         inside a string; escape: "" (none), "\\", or "u0" to "u3" (hex digits read)
#   ("num", integer_only, phase, digits)    part way through a number (phases below; digits: in this part)
#   ("obj", node, keys_done, phase, extra)  phase "{" opened, "," after a comma, "key" reading a declared key
#                                           (extra: (texts, position)), ":" key read (extra: the value's node),
#                                           "v" value read
#   ("arr", node, count, phase)             phase "[" opened, "," after a comma, "v" value read
# A frame answers a character with the frames that replace it and whether it used the character; a value that
# only ends when something else follows (a number, a literal) hands the character back to its parent.

# A number's phases: "" nothing yet, "-" sign, "0" a leading zero, "d" integer digits, "." point, "f" fraction
# digits, "e" exponent mark, "s" exponent sign, "x" exponent digits; each maps the characters it takes to the next.
DIGITS = "0123456789"
_EXPONENT = {"e": "e", "E": "e"}
NUMBER_STEPS = {
    "": {"-": "-", "0": "0", **dict.fromkeys(DIGITS[1:], "d")}, "-": {"0": "0", **dict.fromkeys(DIGITS[1:], "d")},
    "0": {".": ".", **_EXPONENT}, "d": {**dict.fromkeys(DIGITS, "d"), ".": ".", **_EXPONENT},
    ".": dict.fromkeys(DIGITS, "f"), "f": {**dict.fromkeys(DIGITS, "f"), **_EXPONENT},
    "e": {"+": "s", "-": "s", **dict.fromkeys(DIGITS, "x")}, "s": dict.fromkeys(DIGITS, "x"),
    "x": dict.fromkeys(DIGITS, "x")}
NUMBER_ENDS = frozenset("0dfx")  # phases where a number may end
FRACTION_OR_EXPONENT = frozenset(".ef")
# The most digits each part of a number may have: a float64 holds no more, and a model stuck on a digit would
# otherwise write digits until max_tokens ran out.
NUMBER_DIGITS = {"0": 1, "d": 16, "f": 16, "x": 3}


def start(node: Node) -> tuple:
    return (("value", node),)


def advance(state: tuple | None, text: str) -> tuple | None:
    """The state after text, or None when text cannot come next (an empty state: the document is complete)."""
    for char in text:
        if state is None:
            return None
        state = _advance_char(state, char)
    return state


def _advance_char(state: tuple, char: str) -> tuple | None:
    while state:
        outcome = _FRAMES[state[-1][0]](state[-1], char)
        if outcome is None:
            return None
        frames, used = outcome
        state = state[:-1] + frames
        if used:
            return state
    return None  # the document is complete: nothing may follow it


def can_end(state: tuple) -> bool:
    """Whether the document is complete if nothing follows (a number or literal at the end is finished)."""
    for frame in reversed(state):
        finished = ((frame[0] == "num" and frame[2] in NUMBER_ENDS)
                    or (frame[0] == "lit" and any(len(t) == frame[2] for t in frame[1])))
        if not finished:
            return False
    return True


def _value(frame, char):
    node = frame[1]
    if node.literals is not None:
        return (("lit", node.literals, 0),), False
    if char == "{" and "object" in node.types:
        return (("obj", node, frozenset(), "{", None),), True
    if char == "[" and "array" in node.types:
        return (("arr", node, 0, "["),), True
    if char == '"' and "string" in node.types:
        return (("str", ""),), True
    if (char == "-" or char in DIGITS) and node.types & {"number", "integer"}:
        return (("num", "number" not in node.types, "", 0),), False
    words = tuple(w for kind, w in (("boolean", "true"), ("boolean", "false"), ("null", "null")) if kind in node.types)
    return ((("lit", words, 0),), False) if any(w[0] == char for w in words) else None


def _literal(frame, char):
    _, texts, position = frame
    longer = tuple(t for t in texts if len(t) > position and t[position] == char)
    if longer:
        return (("lit", longer, position + 1),), True
    return ((), False) if any(len(t) == position for t in texts) else None


def _string(frame, char):
    escape = frame[1]
    if escape == "":
        if char == '"':
            return (), True
        if char == "\\":
            return (("str", "\\"),), True
        return None if ord(char) < 0x20 else ((frame,), True)  # control characters must be escaped
    if escape == "\\":
        if char in '"\\/bfnrt':
            return (("str", ""),), True
        return ((("str", "u0"),), True) if char == "u" else None
    if char not in "0123456789abcdefABCDEF":
        return None
    read = int(escape[1]) + 1
    return ((("str", "") if read == 4 else ("str", f"u{read}")),), True


def _number(frame, char):
    _, integer_only, phase, digits = frame
    following = NUMBER_STEPS[phase].get(char)
    if following is not None and not (integer_only and following in FRACTION_OR_EXPONENT):
        count = digits + 1 if following == phase else int(char in DIGITS)
        if count <= NUMBER_DIGITS.get(following, 0):
            return (("num", integer_only, following, count),), True
    return ((), False) if phase in NUMBER_ENDS else None


def _object(frame, char):
    _, node, done, phase, extra = frame
    closable = node.required <= done
    if phase == "key":
        texts, position = extra
        longer = tuple(t for t in texts if len(t) > position and t[position] == char)
        whole = [t for t in longer if len(t) == position + 1]
        if whole:  # a JSON string ends at its closing quote, so no declared key is the start of another
            name = node.key_texts[whole[0]]
            return (("obj", node, done | {name}, ":", node.properties[name]),), True
        return ((("obj", node, done, "key", (longer, position + 1)),), True) if longer else None
    if phase == ":":
        return ((("obj", node, done, "v", None), ("value", extra)), True) if char == ":" else None
    if phase == "v":
        if char == "}" and closable:
            return (), True
        more = node.properties is None or len(done) < len(node.properties)
        return ((("obj", node, done, ",", None),), True) if char == "," and more else None
    if char == "}" and phase == "{" and closable:
        return (), True
    if char != '"':
        return None
    if node.properties is None:  # any key: read it as a string, then any value
        return (("obj", node, done, ":", ANY), ("str", "")), True
    texts = tuple(t for t, name in node.key_texts.items() if name not in done)
    return ((("obj", node, done, "key", (texts, 1)),), True) if texts else None


def _array(frame, char):
    _, node, count, phase = frame
    items = node.items or ANY
    if phase == "v":
        if char == "]" and count >= node.min_items:
            return (), True
        more = node.max_items is None or count < node.max_items
        return ((("arr", node, count, ","),), True) if char == "," and more else None
    if phase == "[" and char == "]":
        return ((), True) if node.min_items == 0 else None
    if node.max_items == 0:
        return None
    return (("arr", node, count + 1, "v"), ("value", items)), False


_FRAMES = {"value": _value, "lit": _literal, "str": _string, "num": _number, "obj": _object, "arr": _array}


# ---- tokens ----------------------------------------------------------------------------------------------------

class JsonVocabulary:
    """The vocabulary as the recognizer reads it, shared by every constrained answer of one engine: which tokens
    may come next in a state (cached, as answers revisit the same states), and which end the answer."""

    def __init__(self, texts: list[str], special: set[int], end_ids: list[int]):
        self.size, self.end_ids = len(texts), list(end_ids)
        self.texts = ["" if i in special else t for i, t in enumerate(texts)]  # a special token writes no JSON
        self.by_first: dict[str, list[int]] = {}
        for token, text in enumerate(self.texts):
            if text:
                self.by_first.setdefault(text[0], []).append(token)
        # Inside a string, a token without a quote, backslash or control character keeps the string open.
        plain = [bool(t) and not any(c in '"\\' or ord(c) < 0x20 for c in t) for t in self.texts]
        self.string_safe = torch.tensor(plain, dtype=torch.bool)
        self.string_risky = [i for i, t in enumerate(self.texts) if t and not plain[i]]
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def allowed(self, state: tuple) -> torch.Tensor:
        """A boolean mask over the vocabulary: the tokens that may come next (end tokens once it may end)."""
        if (mask := self._masks.get(state)) is not None:
            self._masks.move_to_end(state)
            return mask
        if state and state[-1] == ("str", ""):
            mask = self.string_safe.clone()
            candidates = self.string_risky
        else:
            mask = torch.zeros(self.size, dtype=torch.bool)
            candidates = [t for first, tokens in self.by_first.items() if advance(state, first) is not None
                          for t in tokens]
        for token in candidates:
            if advance(state, self.texts[token]) is not None:
                mask[token] = True
        if can_end(state):
            mask[self.end_ids] = True
        self._masks[state] = mask
        if len(self._masks) > MASKS_KEPT:
            self._masks.popitem(last=False)
        return mask


class JsonConstraint:
    """One answer's way through its schema: fed the tokens as they are generated, it masks the next logits."""

    def __init__(self, root: Node, vocabulary: JsonVocabulary):
        self.vocabulary, self.state, self.read = vocabulary, start(root), 0

    def catch_up(self, generated: torch.Tensor) -> None:
        """Read the tokens generated since the last call (the row's generated ids so far)."""
        for token in generated[self.read:].tolist():
            if self.state is None:
                break
            self.state = () if token in self.vocabulary.end_ids else advance(self.state, self.vocabulary.texts[token])
        self.read = len(generated)

    @property
    def complete(self) -> bool:
        """The document is closed and nothing may follow (a bare number or literal still waits for an end token)."""
        return self.state == ()

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores with every token that cannot come next at -inf."""
        allowed = None if self.state is None else self.vocabulary.allowed(self.state)
        if allowed is None or not bool(allowed.any()):  # a vocabulary without the ASCII characters; never unmasked
            raise RuntimeError("response_format: no token of this model's vocabulary can continue the JSON answer")
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))
