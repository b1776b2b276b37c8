"""The OpenAI wire format: request models (pydantic validates them) and the replies and stream chunks.

Every OpenAI parameter that changes the answer is honoured or refused. Honoured: those declared below, among
them logprobs (and top_logprobs; not with stream) and response_format (text, json_object, json_schema: see
json_constraint.py). Refused with a 400 naming the parameter (REFUSED): tools, tool_choice, functions,
function_call, logit_bias, presence_penalty and frequency_penalty, echo, suffix and best_of, unless sent with
the value that changes nothing (REFUSED lists it: 0, "none", an empty list, ...). Ignored, as they
change nothing in a one-model server's answer: user, metadata, store, service_tier, parallel_tool_calls,
prediction, reasoning_effort, prompt_cache_key, safety_identifier, and any other name this server does not know.
Types are strict: "0.5" is not a temperature, true is not a max_tokens. Ranges are checked here too (a seed
past 64 bits, a NaN temperature), so every bad value is a 400 naming the parameter, never a failure deeper in.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, field_validator

from tailorlm.serve.engine import Completion, Sampling
from tailorlm.serve.json_constraint import SchemaError, compile_response_format
from tailorlm.serve.logprobs import chat_logprobs, text_logprobs

# OpenAI's own defaults where it has a finite one (legacy completions: 16); chat gets room for a real answer.
DEFAULT_MAX_TOKENS = {"chat": 256, "text": 16}
MAX_STOPS = 4  # as OpenAI
MAX_TOP_LOGPROBS = {"chat": 20, "text": 5}  # as OpenAI

_NO_TOOLS = "it does not call tools or functions"
_NO_PENALTY = "it applies no repetition penalty; only 0 (the default) is accepted"
REFUSED: dict[str, tuple[tuple, str]] = {
    "tools": ((None, []), _NO_TOOLS), "tool_choice": ((None, "none"), _NO_TOOLS),
    "functions": ((None, []), _NO_TOOLS), "function_call": ((None, "none"), _NO_TOOLS),
    "logit_bias": ((None, {}), "it does not bias token logits"),
    "presence_penalty": ((None, 0), _NO_PENALTY), "frequency_penalty": ((None, 0), _NO_PENALTY),
    "echo": ((None, False), "an answer never repeats its prompt"),
    "suffix": ((None, ""), "it does not insert text before a suffix"),
    "best_of": ((None, 1), "it generates one candidate per request"),
}

PositiveStrictInt = Annotated[int, Strict(), Field(gt=0)]
# OpenAI's range for seed (a signed 64-bit integer); torch.manual_seed takes all of it.
Seed = Annotated[int, Strict(), Field(ge=-2**63, le=2**63 - 1)]


class ParameterError(Exception):
    """A parameter of a valid type and range that this server's own limits refuse (a 400 naming it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JsonSchemaFormat(_Request):
    name: StrictStr
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")  # None: any JSON value
    strict: Optional[StrictBool] = None  # the schema is always enforced exactly
    description: Optional[StrictStr] = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value):
        # Newer clients may send content as a list of parts; text parts are the only kind a text model reads.
        if isinstance(value, list):
            if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
                return "".join(p["text"] for p in value)
            raise ValueError("content parts must all be text parts ({'type': 'text', 'text': ...})")
        return value


class StreamOptions(_Request):
    include_usage: StrictBool = False


class SamplingRequest(_Request):
    model_config = ConfigDict(extra="allow")  # kept, so that refused parameters can be named (REFUSED)
    model: StrictStr
    max_tokens: Optional[PositiveStrictInt] = None
    temperature: Annotated[float, Strict(), Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    n: StrictInt = 1
    stop: Optional[list[StrictStr]] = None
    seed: Optional[Seed] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = None
    # The parameters that set the completion's length; when several are given, the first one sets it.
    length_params: ClassVar[tuple[str, ...]] = ("max_tokens",)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and (len(value) > MAX_STOPS or any(s == "" for s in value)):
            raise ValueError(f"at most {MAX_STOPS} stop strings, none of them empty")
        return value

    def sampling(self, max_tokens_limit: int | None = None) -> Sampling:
        """The engine's settings. An asked length over the server's limit is refused; the default is capped."""
        for param, value in (self.model_extra or {}).items():
            if param in REFUSED and not _changes_nothing(value, REFUSED[param][0]):
                raise ParameterError(f"{param} is not supported by this server: {REFUSED[param][1]}", param)
        logprobs = self.logprob_alternatives()
        if logprobs is not None and self.stream:
            raise ParameterError("logprobs is not supported with stream: true on this server; ask for the whole "
                                 "answer (stream: false) to get log-probabilities", "logprobs")
        asked = [(p, getattr(self, p)) for p in self.length_params if getattr(self, p) is not None]
        for param, value in asked:
            if max_tokens_limit is not None and value > max_tokens_limit:
                raise ParameterError(f"{param} is {value}; this server allows at most {max_tokens_limit} tokens "
                                     f"per completion", param)
        default = DEFAULT_MAX_TOKENS[self.kind()]
        budget = asked[0][1] if asked else min(default, max_tokens_limit or default)
        return Sampling(budget, self.temperature, self.top_p, self.seed, tuple(self.stop or ()), logprobs,
                        self.json_format())

    def json_format(self):
        """The compiled response_format (None: free text); one this server cannot enforce exactly is a 400."""
        asked = self.response_format
        if asked is None or asked.type == "text":
            return None
        if asked.type == "json_schema" and asked.json_schema is None:
            raise ParameterError("response_format: type 'json_schema' needs a json_schema object "
                                 "({'name': ..., 'schema': {...}})", "response_format")
        try:
            return compile_response_format(asked.type, asked.json_schema and asked.json_schema.json_schema)
        except SchemaError as e:
            raise ParameterError(f"response_format: {e}", "response_format") from None

    def logprob_alternatives(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        return None

    def kind(self) -> str:
        return "text"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[PositiveStrictInt] = None  # the newer name for max_tokens
    logprobs: StrictBool = False
    top_logprobs: Optional[Annotated[int, Strict(), Field(ge=0, le=MAX_TOP_LOGPROBS["chat"])]] = None
    length_params: ClassVar[tuple[str, ...]] = ("max_tokens", "max_completion_tokens")

    def logprob_alternatives(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParameterError("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def kind(self) -> str:
        return "chat"

    def turns(self) -> list[dict]:
        # 'developer' is OpenAI's newer name for the system role.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | list[StrictInt]
    logprobs: Optional[Annotated[int, Strict(), Field(ge=0, le=MAX_TOP_LOGPROBS["text"])]] = None

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            raise ValueError("a list of prompts is not supported; send one prompt per request")
        if not isinstance(value, str) and not (isinstance(value, list) and value
                                               and all(type(v) is int for v in value)):
            raise ValueError("prompt must be a string or a non-empty list of token ids")
        return value


def _changes_nothing(value, accepted: tuple) -> bool:
    # 0.0 is the zero penalty a client sends; false is not (nor is true the best_of of 1).
    return any(value is a or (value == a and type(value) is not bool) for a in accepted)


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message for pydantic's errors, and the parameter the first one is about."""
    parts, params = [], []
    for e in errors:
        loc = [x for x in e["loc"] if x != "body"]
        if e["type"] == "json_invalid":
            parts.append(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
            continue
        if not loc or (e["type"] == "model_attributes_type"):
            parts.append("the request body must be a JSON object")
            continue
        path = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
        params.append(path)
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"missing required parameter '{path}'" if e["type"] == "missing" else f"{path}: {message}")
    return "; ".join(parts), (params[0] if params else None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def chat_reply(c: Completion, model_id: str) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "logprobs": chat_logprobs(c.logprobs)}],
            "usage": usage(c)}


def text_reply(c: Completion, model_id: str) -> dict:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": text_logprobs(c.logprobs)}],
            "usage": usage(c)}


class ChunkWriter:
    """The SSE events of one streamed reply: OpenAI chunks sharing one id, then 'data: [DONE]'."""

    def __init__(self, chat: bool, model_id: str):
        self.chat, self.model_id = chat, model_id
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())

    def _event(self, choices: list[dict], **extra) -> str:
        import json

        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model_id, "choices": choices, **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    def start(self) -> str | None:
        """The opening chunk that names the role (chat only)."""
        if not self.chat:
            return None
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def text(self, piece: str, finish_reason: str | None = None) -> str:
        if self.chat:
            delta = {"content": piece} if piece else {}
            return self._event([{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}])
        return self._event([{"index": 0, "text": piece, "finish_reason": finish_reason, "logprobs": None}])

    def usage(self, c: Completion) -> str:
        return self._event([], usage=usage(c))

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
