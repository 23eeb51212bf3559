"""OpenAI request bodies (pydantic) and OpenAI's error JSON."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from phasesplit import validation
from phasesplit.prefix_hash import MAX_CACHE_SALT_LENGTH

# Bounds of the proto fields the values travel in (worker.proto): a value outside is the request's error.
INT32_MAX, UINT32_MAX, UINT64_MAX = 2**31 - 1, 2**32 - 1, 2**64 - 1
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256   # OpenAI allows 4; each one costs the workers on every token


def _unicode(text: str) -> str:
    """JSON may escape lone surrogates ("\\ud800"); no tokenizer or protobuf string can hold them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text; found the lone surrogate {text[e.start]!r} at "
                         f"character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
CacheSalt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CACHE_SALT_LENGTH), AfterValidator(_unicode)]


def _only(allowed: tuple, message: str) -> AfterValidator:
    """An option the router does not implement: accepted at its allowed (default) values, refused otherwise."""
    def check(value):
        if value not in allowed:
            raise ValueError(message)
        return value
    return AfterValidator(check)


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable_error", code="service_unavailable")


def rate_limited(message: str, retry_after: float) -> APIError:
    """A 429 as OpenAI's request rate limit answers it: its clients raise `RateLimitError` and honour `Retry-After`."""
    return APIError(429, message, type="requests", code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, _only((1,), "only n=1 is supported")] = 1
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=INT32_MAX, description="extension: 0 or -1 = off")
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    cache_salt: CacheSalt | None = Field(None, description="vLLM's extension: only requests with the same salt "
                                         "share cached prompt blocks")
    logprobs: Annotated[Any, _only((None, False, 0), "logprobs are not supported")] = None
    presence_penalty: Annotated[float, _only((0,), "penalties are not supported; only 0 is allowed")] = 0.0
    frequency_penalty: Annotated[float, _only((0,), "penalties are not supported; only 0 is allowed")] = 0.0
    logit_bias: Annotated[dict[str, float] | None, _only((None, {}), "logit_bias is not supported; send none or {}")] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, not {len(stop)}")
        if too_long := next((s for s in stop if len(s) > MAX_STOP_CHARS), None):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, not {len(too_long)}")
        return [_unicode(s) for s in stop]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[int]
    echo: Annotated[bool, _only((False,), "echo is not supported")] = False
    suffix: Annotated[str | None, _only((None, ""), "suffix is not supported")] = None
    best_of: Annotated[int | None, _only((None, 1), "only best_of=1 is supported")] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return _unicode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       and 0 <= t <= UINT32_MAX for t in prompt):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise ValueError("only one prompt per request is supported")
        raise ValueError(f"prompt must be a string or a non-empty list of token ids (integers in 0..{UINT32_MAX})")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | None = None
    name: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> str | None:
        if content is None or isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("content must be a string or a list of text parts")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    top_logprobs: Annotated[int | None, _only((None, 0), "logprobs are not supported")] = None
    tools: Annotated[list[Any] | None, _only((None, []), "tools are not supported; send none")] = None
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only_format(cls, response_format: dict | None) -> None:
        if response_format and response_format.get("type") != "text":
            raise ValueError(f"only {{\"type\": \"text\"}} is supported, not {response_format.get('type')!r}")
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict]:
        return [m.model_dump(exclude_none=True) | {"content": m.content or ""} for m in self.messages]


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Validates a JSON body; any problem is an APIError (400) naming the field."""
    try:
        data = json.loads(raw)
    except ValueError as e:   # not UTF-8, not JSON, or a number too long to convert
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        param, message = validation.first(e, model)
        raise APIError(400, f"{param}: {message}" if param else message, param=param or None) from None
