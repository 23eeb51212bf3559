"""A model directory as `transformers` itself writes it, for each supported architecture: the model's
`save_pretrained` (config.json, model.safetensors, generation_config.json) and a tokenizer's
(`PreTrainedTokenizerFast` over a BPE trained here: tokenizer.json, tokenizer_config.json,
chat_template.jinja). The engine loads it and generates with transformers' logits, and our
tokenizer encodes and renders the chat template as transformers does. Nothing is downloaded."""

import pathlib

import jinja2
import pytest
import torch

transformers = pytest.importorskip("transformers")

from support.checkpoints import write_checkpoint  # noqa: E402
from tokenizers import Tokenizer as BPETokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from phasesplit.engine.model import dense_causal_attention  # noqa: E402
from phasesplit.engine.tokenizer import Tokenizer  # noqa: E402

PROSE = (pathlib.Path(__file__).resolve().parents[2] / "worker" / "phasesplit" / "data" / "prose.txt").read_text()
ALTERNATE = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"

# The chat templates of the families' published checkpoints (Llama 2, Llama 3, Qwen2, Mistral), in their shape.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + ALTERNATE + "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + ALTERNATE + "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# case (tests/support/checkpoints.py), pre-tokenizer, special tokens (bos, eos, others), template
FAMILIES = {
    "llama2": ("llama", "metaspace", ("<s>", "</s>", ["<unk>"]), LLAMA2_TEMPLATE),
    "llama3": ("llama3-rope", "bytelevel",
               ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]), LLAMA3_TEMPLATE),
    "qwen2": ("qwen2-bias-tied", "bytelevel", (None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>"]), CHATML_TEMPLATE),
    "mistral": ("mistral", "metaspace", ("<s>", "</s>", ["<unk>"]), MISTRAL_TEMPLATE),
}
VOCAB = {"metaspace": 256, "bytelevel": 320}  # byte-level BPE starts from 256 byte tokens
CHATS = [
    [{"role": "user", "content": "Where does the river go?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who keeps the ferry?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Good morning."},
     {"role": "user", "content": " And the boats? "}],
]
TEXTS = ["The river town woke slowly in the autumn.", "  two  spaces, and a line\nbreak"]


def train_bpe(kind: str, bos: str | None, eos: str, others: list[str]) -> BPETokenizer:
    specials = [t for t in (bos, eos, *others) if t]
    if kind == "metaspace":
        tok = BPETokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB[kind], special_tokens=specials, limit_alphabet=120)
    else:
        tok = BPETokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB[kind], special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([PROSE], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    elif kind == "bytelevel":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_model_dir(path: pathlib.Path, family: str):
    """The model and its tokenizer, each saved by transformers; returns (model class, tokenizer)."""
    case, kind, (bos, eos, others), template = FAMILIES[family]
    bpe = train_bpe(kind, bos, eos, others)
    hf_cls = write_checkpoint(path, case, "rope_parameters", vocab_size=VOCAB[kind])
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, unk_token="<unk>" if kind == "metaspace" else None,
        chat_template=template)
    hf_tokenizer.save_pretrained(path)
    generation = transformers.GenerationConfig(bos_token_id=bpe.token_to_id(bos) if bos else None,
                                               eos_token_id=bpe.token_to_id(eos))
    generation.save_pretrained(path)
    return hf_cls, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_cls, hf_tokenizer = write_model_dir(path, request.param)
    return request.param, path, hf_cls, hf_tokenizer


def test_the_directory_holds_what_the_readme_asks_for(model_dir):
    _, path, _, _ = model_dir
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names, names


def test_our_tokenizer_encodes_and_decodes_as_transformers(model_dir):
    _, path, _, hf_tokenizer = model_dir
    ours = Tokenizer.from_dir(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf_tokenizer(text).input_ids
        assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.bos_token_id == hf_tokenizer.bos_token_id
    assert hf_tokenizer.eos_token_id in ours.eos_token_ids


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_the_chat_template_renders_as_transformers_renders_it(model_dir, chat):
    _, path, _, hf_tokenizer = model_dir
    ours = Tokenizer.from_dir(path)
    messages = CHATS[chat]
    if FAMILIES[model_dir[0]][3] == MISTRAL_TEMPLATE and messages[0]["role"] == "system":
        with pytest.raises(jinja2.TemplateError, match="must alternate"):
            hf_tokenizer.apply_chat_template(messages, tokenize=False)
        with pytest.raises(jinja2.TemplateError, match="must alternate"):
            ours.apply_chat_template(messages)
        return
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert ours.encode_chat(messages) == hf_tokenizer(expected, add_special_tokens=False).input_ids


def test_roles_that_do_not_alternate_are_refused_as_transformers_refuses_them(model_dir):
    family, path, _, hf_tokenizer = model_dir
    if family not in ("llama2", "mistral"):
        pytest.skip("only the Llama 2 and Mistral templates check the roles")
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        hf_tokenizer.apply_chat_template(messages, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        Tokenizer.from_dir(path).apply_chat_template(messages)


def test_the_engine_generates_with_transformers_logits(model_dir):
    _, path, hf_cls, hf_tokenizer = model_dir
    engine = LLMEngine(EngineConfig(str(path), dtype="float32", device="cpu", num_kv_blocks=64))
    prompt = engine.tokenizer.encode_chat(CHATS[0])
    engine.add_request("chat", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    generated = []
    while engine.has_unfinished():
        generated += [t for out in engine.step() for t in out.token_ids]
    assert len(generated) == 12
    hf = hf_cls.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompt + generated)
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
        logits = engine.model.compute_logits(engine.model(ids, torch.arange(len(ids)), dense_causal_attention()))
    assert (logits - expected).abs().max().item() <= 1e-4
    # greedy: each generated token is transformers' argmax after the tokens before it
    assert expected[len(prompt) - 1:-1].argmax(-1).tolist() == generated
    assert hf_tokenizer.decode(generated, skip_special_tokens=True) == engine.tokenizer.decode(generated)
