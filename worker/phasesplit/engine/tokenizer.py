"""`Tokenizer`: `tokenizer.json` through `tokenizers`, the chat template through sandboxed jinja2,
EOS ids from the generation config; `IncrementalDetokenizer` turns a token stream into text deltas.

A tokenizer is read from `TOKENIZER_FILES`, the few small files of a model directory it needs: a
worker serves them to its router, which then needs no copy of the model."""

import hashlib
import json
from pathlib import Path

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json",
                   "chat_template.jinja", "chat_template.json")


def read_tokenizer_files(model_dir) -> dict[str, bytes]:
    """The `TOKENIZER_FILES` that `model_dir` has, by name."""
    model_dir = Path(model_dir)
    return {name: (model_dir / name).read_bytes() for name in TOKENIZER_FILES if (model_dir / name).is_file()}


def tokenizer_digest(files: dict[str, bytes]) -> str:
    """Names a tokenizer: equal for equal files, whichever directory they were read from."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{len(files[name])}\0".encode())
        h.update(files[name])
    return h.hexdigest()


def _json(files: dict[str, bytes], name: str) -> dict:
    return json.loads(files[name]) if name in files else {}


def _token_content(token) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as {"content": ...} objects.
    return token.get("content") if isinstance(token, dict) else token


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _chat_template(files: dict[str, bytes], tokenizer_config: dict) -> str | None:
    # transformers 5 writes the template to its own file; older checkpoints keep it in tokenizer_config.json.
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode()
    template = _json(files, "chat_template.json").get("chat_template") or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, chat_template: str | None = None,
                 eos_token_ids: list[int] | None = None, bos_token: str | None = None, eos_token: str | None = None):
        self._tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_ids = list(eos_token_ids or [])
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        files = read_tokenizer_files(model_dir)
        if "tokenizer.json" not in files:
            raise FileNotFoundError(f"tokenizer.json not found in model directory {model_dir}")
        return cls.from_files(files)

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> "Tokenizer":
        """From `TOKENIZER_FILES` contents by name; `tokenizer.json` is required."""
        if "tokenizer.json" not in files:
            raise ValueError("tokenizer.json is missing")
        tokenizer = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode())
        tokenizer_config = _json(files, "tokenizer_config.json")
        bos_token = _token_content(tokenizer_config.get("bos_token"))
        eos_token = _token_content(tokenizer_config.get("eos_token"))
        eos_ids = (_as_list(_json(files, "generation_config.json").get("eos_token_id"))
                   + _as_list(_json(files, "config.json").get("eos_token_id")))
        if not eos_ids and eos_token and tokenizer.token_to_id(eos_token) is not None:
            eos_ids = [tokenizer.token_to_id(eos_token)]
        return cls(tokenizer, _chat_template(files, tokenizer_config), list(dict.fromkeys(eos_ids)),
                   bos_token, eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        # encode_batch releases the GIL while it works (encode does not): a long prompt tokenized in
        # a worker thread then leaves the caller's event loop running.
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json has no chat_template)")
        _check_messages(messages)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered chat; the template already places any BOS, so none is added again."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"messages[{i}].{key} must be a string")


class IncrementalDetokenizer:
    """Text deltas for one sequence's generated tokens, never splitting a multi-byte UTF-8 character.

    Decodes a small window of recent tokens (so tokenizers that strip leading spaces decode right)
    and holds text back while it ends in an incomplete character.
    """

    CONTEXT = 6  # prompt tokens kept as decoding context

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids=(), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids)[-self.CONTEXT:]
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.token_ids.append(int(token_id))
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing printable yet (special token, or a character still incomplete)
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back at the end of the sequence (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        delta = self._decode(self.prefix_offset)[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.text += delta
        return delta
