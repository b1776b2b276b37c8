"""The JSON bodies the studio's API takes, as pydantic models: a wrong type or a value out of range is a 400
naming the field (app.py turns FastAPI's RequestValidationError into {"error": describe(...)}), never a 500."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from tailorlm.studio.actions import EXPORT_FORMATS


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class DraftChange(RequestBody):
    """POST /api/draft: dotted settings to set (None or '' resets one to its default) and ones to reset."""
    changes: dict[str, Any] = Field(default_factory=dict, alias="set")
    removals: list[str] = Field(default_factory=list, alias="unset")


class StartRequest(RequestBody):
    """POST /api/runs: the draft as a run, or with a budget ("20m", "1h") as an auto search (tailor auto)."""
    budget: Optional[str] = Field(None, min_length=1, max_length=20)


class ChatMessage(RequestBody):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(RequestBody):
    """POST /api/chat: a conversation (chat runs) or a row's input fields (task runs) for a run and its base."""
    run: str
    messages: list[ChatMessage] = Field(default_factory=list)
    max_new_tokens: int = Field(128, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    fields: Optional[dict[str, str]] = None  # task inputs by template field, e.g. {"text": "..."}
    constrained: Optional[bool] = None  # task runs: answer within the label set (None: when the set is closed)


class ExportRequest(RequestBody):
    """POST /api/export: which run, in which format, and the GGUF quantization (None: the format's default)."""
    run: str
    format: Literal[EXPORT_FORMATS] = "gguf"
    quant: Optional[str] = None


def describe(errors: list[dict]) -> str:
    """FastAPI's validation errors as one sentence naming each field: 'max_new_tokens: Input should be ...'."""
    problems = []
    for error in errors:
        if error.get("type") == "json_invalid":
            problems.append(f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'unreadable')})")
            continue
        field = ".".join(str(part) for part in error.get("loc", ())[1:])  # loc starts with body, query or path
        problems.append(f"{field or 'the request body'}: {error.get('msg', 'invalid')}")
    return "; ".join(problems) or "the request is not valid"
