"""The OpenAI surface: request bodies (pydantic, validated by FastAPI) and the response payloads.

Bodies keep unknown fields (``extra="allow"``) only so `refuse_unknown` can name them in a 400:
prefixtune never silently ignores a parameter it does not implement. The payload builders are
plain functions of already-generated text and tokens; nothing here talks to an engine.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ..names import BASE_NAME
from .requests import Token

COMPLETION_DEFAULT_TOKENS = 16  # max_tokens when a request gives none, as OpenAI's completions
CHAT_DEFAULT_TOKENS = 64


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown keys are refused by name (400), as top-level ones
    include_usage: bool = False  # a last chunk with no choices carries the request's usage


class Body(BaseModel):
    """Fields shared by both endpoints; unknown fields are kept so they can be refused by name."""

    model_config = ConfigDict(extra="allow")
    model: str = BASE_NAME
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise HTTPException(400, "stop: up to 4 non-empty strings")
        return stops

    def top(self) -> int | None:
        """Top-k log-probabilities per token (0: only the chosen token's); None: none asked."""
        raise NotImplementedError

    def token_budget(self) -> int:
        return self.max_tokens or COMPLETION_DEFAULT_TOKENS

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def refuse_unknown(self) -> None:
        """400 naming every parameter prefixtune does not implement (and stream_options without stream)."""
        extra = sorted(key for key, value in (self.model_extra or {}).items() if value is not None)
        if self.stream_options is not None:
            extra += [f"stream_options.{key}" for key in sorted(self.stream_options.model_extra or {})]
        if extra:
            raise HTTPException(400, f"unsupported parameter(s) {extra}: prefixtune does not implement them")
        if self.stream_options is not None and not self.stream:
            raise HTTPException(400, "stream_options needs stream: true")


class CompletionBody(Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)

    def top(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise HTTPException(400, "top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or CHAT_DEFAULT_TOKENS


# ---------------------------------------------------------------------- response payloads
def logprobs_payload(tokens: list[Token], chat: bool, tokenizer: Any) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of one choice (chat: per-token objects; completions: parallel lists)."""

    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    if chat:
        return {
            "content": [
                {
                    "token": text(t.id),
                    "logprob": t.logprob,
                    "bytes": list(text(t.id).encode()),
                    "top_logprobs": [
                        {"token": text(i), "logprob": lp, "bytes": list(text(i).encode())} for i, lp in t.top or []
                    ],
                }
                for t in tokens
            ]
        }
    offsets, offset = [], 0
    for t in tokens:
        offsets.append(offset)
        offset += len(text(t.id))
    return {
        "tokens": [text(t.id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{text(i): lp for i, lp in t.top} if t.top else None for t in tokens],
        "text_offset": offsets,
    }


def choice_payload(index: int, text: str, finish_reason: str | None, chat: bool, logprobs: dict | None) -> dict:
    result: dict[str, Any] = {"index": index, "finish_reason": finish_reason}
    if chat:
        result["message"] = {"role": "assistant", "content": text}
    else:
        result["text"] = text
    result["logprobs"] = logprobs
    return result


def chunk_payload(
    ident: str, name: str, index: int, delta: Any, finish: str | None, chat: bool, logprobs: dict | None = None
) -> dict[str, Any]:
    """One streamed chunk for choice `index` (`delta`: chat's ``{"content": ...}`` or completion text)."""
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    choice |= {"delta": delta} if chat else {"text": delta}
    return {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": [choice],
    }


def usage_payload(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_payload(message: str, code: int) -> dict[str, Any]:
    """OpenAI's error shape, so its client raises the matching error with our message."""
    kind = "invalid_request_error" if code < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": code}}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event (a payload as JSON, or a literal such as ``[DONE]``)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
