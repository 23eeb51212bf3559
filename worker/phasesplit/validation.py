"""Pydantic's validation errors as one-line messages people read: `field: what is allowed, got VALUE`.

One wording for `phasesplit render`, `phasesplit local` and the router's 400s: "did you mean `maxNumSeqs`?"
for an unknown field, words instead of a regex, the value given next to the one allowed, no pydantic jargon."""

from __future__ import annotations

import difflib
import types
import typing

from pydantic import BaseModel, ValidationError

# What the spec's patterns mean, in the words of the CRD's descriptions.
PATTERN_WORDS = {
    r"^[a-z]([-a-z0-9]*[a-z0-9])?$": "a DNS label: lowercase letters, digits and '-', starting with a letter and "
                                     "ending with a letter or digit (it names the router's Service)",
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$": "a DNS label: lowercase letters, digits and '-', starting and ending with "
                                        "a letter or digit",
    r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkKMGTPE]i?)?$": "a Kubernetes quantity (e.g. 500m, 2, 4Gi)",
    r"^/": "an absolute path (starting with /)",
    r"^[A-Za-z0-9][A-Za-z0-9._/-]*$": "a model name: letters, digits, '.', '_', '/' and '-', starting with a letter "
                                      "or digit",
    r"^[-._a-zA-Z][-._a-zA-Z0-9]*$": "an environment variable name: letters, digits, '.', '_' and '-', not "
                                     "starting with a digit",
    r"^[A-Z_]+$": "a Linux capability name in capitals (e.g. SYS_PTRACE)",
    r"^https?://": "an http:// or https:// URL",
}
_COMPARISONS = {"greater_than": ("greater than", "gt"), "greater_than_equal": ("greater than or equal to", "ge"),
                "less_than": ("less than", "lt"), "less_than_equal": ("less than or equal to", "le")}
_KINDS = {"int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
          "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
          "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
          "dict_type": "an object of names to values", "model_type": "an object of fields",
          "model_attributes_type": "an object of fields", "none_required": "null"}
_SHOWS_VALUE = {"string_pattern_mismatch", "literal_error", "enum", *_COMPARISONS, *_KINDS}


def one_line(error: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> str:
    return "; ".join(messages(error, model, prefix))


def messages(error: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """One `where: what` per field (the alternatives of a union merged); `model` finds the fields an unknown
    one may have meant."""
    found: dict[str, list[str]] = {}
    for err in error.errors(include_url=False):
        loc = field_location(err["loc"])
        found.setdefault(location(loc, prefix), []).append(describe(err, model, loc))
    return [f"{where}: {_either(texts)}" if where else _either(texts) for where, texts in found.items()]


def first(error: ValidationError, model: type[BaseModel] | None = None) -> tuple[str, str]:
    """The first problem as (where, what): the router answers one at a time, naming the field as OpenAI's `param`."""
    err = error.errors(include_url=False)[0]
    loc = field_location(err["loc"])
    return location(loc), describe(err, model, loc)


def yaml_problem(path, error: Exception) -> str:
    """A YAML parse error as `FILE: line L, column C: not valid YAML: what` (PyYAML names no file we read)."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None) or str(error)
    where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    return f"{where}: not valid YAML: {problem}"


def location(loc: tuple, prefix: str = "") -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(err: dict, model: type[BaseModel] | None = None, loc: tuple = ()) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return _unknown_field(loc, model)
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error") or err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    text = _allowed(kind, ctx) or _plain(err["msg"])
    return f"{text}, got {_shown(err.get('input'))}" if kind in _SHOWS_VALUE else text


def _allowed(kind: str, ctx: dict) -> str | None:
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return f"must be {PATTERN_WORDS[pattern]}" if pattern in PATTERN_WORDS else f"must match {pattern}"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx['expected']}"
    if kind in _COMPARISONS:
        words, key = _COMPARISONS[kind]
        return f"must be {words} {ctx[key]}"
    if kind in _KINDS:
        return f"must be {_KINDS[kind]}"
    if kind == "too_short":
        return f"must have at least {_count(ctx['min_length'], 'item')}"
    if kind == "too_long":
        return f"must have at most {_count(ctx['max_length'], 'item')}"
    if kind == "string_too_short":
        return "must not be empty" if ctx["min_length"] == 1 else f"must be at least {ctx['min_length']} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    return None


def _plain(msg: str) -> str:
    for jargon, plain in (("Input should be", "must be"), ("Value should be", "must be"),
                          ("Input should have", "must have")):
        msg = msg.replace(jargon, plain)
    return msg.replace(" after validation", "")


def _either(texts: list[str]) -> str:
    """The alternatives of a union: `must be a string or a list`."""
    texts = list(dict.fromkeys(texts))
    if len(texts) > 1 and all(t.startswith("must be ") for t in texts):
        return "must be " + " or ".join(t.removeprefix("must be ") for t in texts)
    return texts[0]


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _shown(value) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


# ---- the model behind a location: which fields there are, and which loc parts are pydantic's own ----

def field_location(loc: tuple) -> tuple:
    """The location without pydantic's union tags ('str', 'list[int]', 'function-after[...]')."""
    return tuple(part for part in loc if isinstance(part, int) or not _is_tag(part))


def _is_tag(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none", "union", "literal")


def _unknown_field(loc: tuple, model: type[BaseModel] | None) -> str:
    names = _field_names(model, loc[:-1]) if model is not None and loc else []
    if not names:
        return "unknown field"
    if close := difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6):
        return f"unknown field; did you mean `{close[0]}`?"
    return f"unknown field; the fields here are {', '.join(names)}"


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    here = _model_at(model, loc)
    if here is None:
        return []
    return [f.alias or name for name, f in here.model_fields.items()]


def _model_at(model, loc: tuple) -> type[BaseModel] | None:
    hint = model
    for part in loc:
        hint = _unwrap(hint)
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            field = _field(hint, part)
            if field is None:
                return None
            hint = field.annotation
        elif typing.get_origin(hint) in (list, tuple, set):
            hint = typing.get_args(hint)[0]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            return None
    hint = _unwrap(hint)
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


def _field(model: type[BaseModel], name):
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None


def _unwrap(hint):
    """`Annotated[X, ...]` -> X; `X | None` -> X (the first alternative that is a model or a container)."""
    while True:
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            hint = typing.get_args(hint)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = next((a for a in options if typing.get_origin(a) or
                         (isinstance(a, type) and issubclass(a, BaseModel))), options[0])
        else:
            return hint
