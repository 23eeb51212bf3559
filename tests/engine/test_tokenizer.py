"""The tokenizer of a model directory: round trips, chat template, EOS ids, incremental detokenizing."""

import json
import shutil

import jinja2
import pytest

from phasesplit.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "The river town woke slowly in the autumn.",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "Grüße aus München, ¡Hola desde Málaga! Привет 日本語 中文 🙂🌊 e\u0301",
    "  leading and trailing spaces  \t\n",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]


def test_bpe_merges_common_words(tokenizer):
    ids = tokenizer.encode("the model reads every token", add_special_tokens=False)
    assert len(ids) < len("the model reads every token") / 2  # a trained BPE, not bytes


def test_special_tokens_and_eos_ids(tokenizer, tiny_model_dir):
    assert tokenizer.vocab_size == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert tokenizer.bos_token_id == tokenizer.encode("<|bos|>", add_special_tokens=False)[0]
    im_end = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    eos = tokenizer.encode("<|eos|>", add_special_tokens=False)
    assert len(im_end) == 1 and len(eos) == 1
    assert tokenizer.eos_token_ids == eos + im_end
    assert tokenizer.decode(eos + tokenizer.encode("hi", add_special_tokens=False)) == "hi"
    assert tokenizer.decode(eos, skip_special_tokens=False) == "<|eos|>"


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert tokenizer.apply_chat_template(messages) == (
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = tokenizer.encode_chat(messages)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("messages, field", [
    ([{"role": "user"}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\]\.role"),
    ([], "messages"),
])
def test_bad_messages_name_the_field(tokenizer, messages, field):
    with pytest.raises(ValueError, match=field):
        tokenizer.apply_chat_template(messages)


def test_template_file_and_sandbox(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
    )
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "[user] x\n"
    with pytest.raises(jinja2.TemplateError, match="first message must be from the user"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}])
    (model_dir / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer.from_dir(model_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_json_is_named(tiny_model_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_no_chat_template_is_a_clear_error(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path)
    with pytest.raises(ValueError, match="chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_splits_a_character(tokenizer, text):
    prompt = tokenizer.encode("Once upon a time")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    deltas = [detok.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text == detok.text
    if any(ord(c) > 0x7FF for c in text):  # 3- and 4-byte characters span several byte-level tokens
        assert "" in deltas


def test_incremental_detokenizer_skips_special_tokens_and_flushes_a_partial_character(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    eos = tokenizer.eos_token_ids[0]
    fish = tokenizer.encode("🐟", add_special_tokens=False)
    assert len(fish) > 1
    out = [detok.push(i) for i in tokenizer.encode("ok", add_special_tokens=False) + [eos] + fish[:-1]]
    assert "".join(out) == "ok"
    assert detok.flush() == "\ufffd"  # a sequence cut mid-character ends with the replacement character


def test_transformers_reads_the_same_tokenizer(tokenizer, tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in TEXTS:
        assert hf(text)["input_ids"] == tokenizer.encode(text)
    messages = [{"role": "user", "content": "Hello"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages))
