"""The OpenAI API's shapes, as the official client sends and reads them: requests, errors, chunks.

Requests are parsed here, not by FastAPI, so every bad one is a 400 in OpenAI's error shape
that names the field: malformed JSON, a wrong type, an unknown field, or an OpenAI field this
server does not implement (``logprobs``, ``tools``, ...). Such a field is accepted only when it
is ``null`` or its no-op value (``"echo": false``), so nothing a client asks for is silently
ignored. Limits that depend on the server (``max_tokens``, prompt length) are checked by it.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"  # OpenAI's two types
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------- requests


class StrictBody(BaseModel):
    """A JSON body checked strictly: ``"5"`` is not an int nor ``1`` a bool, and an unknown
    field is an error. ``unsupported`` maps fields that are refused unless ``null`` or the
    given no-op value."""

    model_config = ConfigDict(extra="forbid", strict=True)
    unsupported: ClassVar[dict[str, Any]] = {}


class StreamOptions(StrictBody):
    include_usage: bool = False


class _Generation(StrictBody):
    """Fields both endpoints share."""

    unsupported: ClassVar[dict[str, Any]] = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None}

    model: str = Field(min_length=1, max_length=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="OpenAI's default 1; 0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end-user id; accepted, it changes no output")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generation):
    unsupported: ClassVar[dict[str, Any]] = {**_Generation.unsupported, "best_of": 1, "echo": False,
                                             "logprobs": None, "suffix": None}

    prompt: str = Field(min_length=1, description="one prompt (a list is refused)")
    max_tokens: int = Field(16, ge=1, description="OpenAI's default 16")

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def characters(self) -> int:
        return len(self.prompt)


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class Message(StrictBody):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it: ``developer`` (OpenAI's newer name) is
        ``system``, and text parts are joined by newlines."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Generation):
    unsupported: ClassVar[dict[str, Any]] = {
        **_Generation.unsupported, "logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": None,
        "parallel_tool_calls": None, "functions": None, "function_call": None, "response_format": None,
        "audio": None, "modalities": None, "prediction": None, "reasoning_effort": None, "service_tier": None,
        "store": False, "metadata": None, "web_search_options": None,
    }

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="OpenAI's older name of max_completion_tokens")

    def new_tokens(self) -> int | None:
        """The token limit asked for (``None``: up to the server's limit, as OpenAI's default)."""
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(400, "give max_completion_tokens or max_tokens, not both", param="max_tokens")
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def characters(self) -> int:
        return sum(len(m.for_template()["content"]) for m in self.messages)


Body = TypeVar("Body", bound=StrictBody)


def load_json(raw: bytes) -> dict[str, Any]:
    """``raw`` body -> a JSON object, else ``ApiError(400)``."""
    try:
        body = json.loads(raw)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def validate(body: dict[str, Any], kind: type[Body]) -> Body:
    """A JSON object -> a validated ``kind``; any problem is an ``ApiError(400)`` naming the field."""
    body = dict(body)
    for name, no_op in kind.unsupported.items():
        if name in body:
            if body[name] is not None and body[name] != no_op:
                raise ApiError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")
            del body[name]
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        raise _invalid(err, kind) from None


def _invalid(err: ValidationError, kind: type[BaseModel]) -> ApiError:
    """The first validation error, named by its field; the input is never echoed back."""
    first = err.errors()[0]
    # a union's error names the member it tried ("stop.str"): field names have no capitals or "["
    param = ".".join(str(p) for p in first["loc"] if not re.search(r"[A-Z\[]|^(str|int|float|bool)$", str(p)))
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {param}; this endpoint takes {', '.join(kind.model_fields)}",
                        param=param, code="unknown_parameter")
    if first["type"] == "missing":
        return ApiError(400, f"{param} is required", param=param)
    return ApiError(400, f"{param}: {first['msg']}", param=param)


# ---------------------------------------------------------------------------- responses


def choice(chat: bool, index: int, text: str, finish: str) -> dict[str, Any]:
    """One choice of a whole (not streamed) answer."""
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def delta(chat: bool, index: int, text: str | None = None, finish: str | None = None,
          first: bool = False) -> dict[str, Any]:
    """One choice of a streamed chunk: new ``text``, or the closing ``finish`` reason. A chat
    stream opens each choice with the assistant role."""
    if not chat:
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    content: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
    if text is not None:
        content["content"] = text
    return {"index": index, "delta": content, "finish_reason": finish, "logprobs": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(event: dict[str, Any] | str) -> str:
    """One server-sent event: a JSON object, or the closing ``[DONE]``."""
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"
