"""From a validated OpenAI body to prompt token ids and the workers' sampling parameters."""

from __future__ import annotations

from phasesplit.router.openai_api import APIError, ChatCompletionRequest, CompletionRequest
from phasesplit.v1 import worker_pb2 as pb

COMPLETION_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# Characters per token a prompt may average before it is refused untokenized: text averages 3 to 5; 16 leaves
# room for code and long whitespace runs, and keeps a prompt that could never fit from being tokenized at all.
CHARS_PER_TOKEN = 16


def check_prompt_chars(req: CompletionRequest | ChatCompletionRequest, max_model_len: int, param: str) -> None:
    """Refuses a prompt too long to fit the context at any plausible number of characters per token, before it
    is tokenized (token ids are counted as they are)."""
    if isinstance(req, CompletionRequest):
        size = len(req.prompt) if isinstance(req.prompt, str) else 0
    else:
        size = sum(len(m.content or "") + len(m.name or "") for m in req.messages)
    limit = max_model_len * CHARS_PER_TOKEN
    if size > limit:
        raise APIError(400, f"{param}: this model's maximum context length is {max_model_len} tokens, so at most "
                            f"{limit} characters are accepted ({CHARS_PER_TOKEN} per token); the prompt has {size}",
                       param=param, code="context_length_exceeded")


def completion_prompt_ids(req: CompletionRequest, tokenizer) -> list[int]:
    if isinstance(req.prompt, str):
        ids = tokenizer.encode(req.prompt)
    else:
        ids = list(req.prompt)
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab and max(ids) >= vocab:
            raise APIError(400, f"prompt: token id {max(ids)} is outside the vocabulary (0..{vocab - 1})",
                           param="prompt")
    if not ids:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    return ids


def chat_prompt_ids(req: ChatCompletionRequest, tokenizer) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True)
    except Exception as e:  # the template is user-supplied jinja: any failure is the request's
        raise APIError(400, f"messages: the chat template cannot render them: {e}", param="messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise APIError(400, "messages: render to an empty prompt", param="messages")
    return ids


def check_prompt_length(ids: list[int], max_model_len: int, param: str) -> None:
    if len(ids) >= max_model_len:
        raise APIError(400, f"{param}: this model's maximum context length is {max_model_len} tokens, "
                            f"and the prompt has {len(ids)} tokens (at least one must remain for the output)",
                       param=param, code="context_length_exceeded")


def sampling_params(req: CompletionRequest | ChatCompletionRequest, prompt_len: int,
                    max_model_len: int) -> pb.SamplingParams:
    room = max_model_len - prompt_len
    requested = req.requested_max_tokens
    if requested is None:
        max_tokens = min(COMPLETION_DEFAULT_MAX_TOKENS, room) if isinstance(req, CompletionRequest) else room
    elif requested > room:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{param}: this model's maximum context length is {max_model_len} tokens; the prompt "
                            f"has {prompt_len}, so at most {room} can be generated, not {requested}",
                       param=param, code="context_length_exceeded")
    else:
        max_tokens = requested
    params = pb.SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
                               max_tokens=max_tokens, stop=req.stop, ignore_eos=req.ignore_eos)
    if req.seed is not None:
        params.seed = req.seed
    if req.cache_salt is not None:
        params.cache_salt = req.cache_salt
    return params
