"""OpenAI response bodies and stream chunks for completions and chat completions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """`cached_tokens`: the prompt tokens found in a prefix cache, which no worker computed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": min(cached_tokens, prompt_tokens)}}


@dataclass
class Shape:
    """The envelope of one request's answer: id, model, and whether it is a chat."""

    id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
             cached_tokens: int = 0) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion")
        return body | {"choices": [choice], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None, include_usage: bool, role: bool = False) -> dict:
        """One stream chunk with one choice; `role` opens a chat stream."""
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion")
        body["choices"] = [choice]
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(object_) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens,
                                                                        cached_tokens)}
