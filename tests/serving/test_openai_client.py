"""The official openai client against the router in front of split workers."""

import openai
import pytest

from phasesplit.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPT = "the quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the pools."}]


@pytest.fixture
def client(split):
    with openai.OpenAI(base_url=split.endpoint, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_non_streaming_and_streaming_agree_with_correct_usage(client, tokenizer):
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12

    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reply.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_chat_non_streaming_and_streaming_agree_with_correct_usage(client, tokenizer):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    message = reply.choices[0].message
    assert message.role == "assistant" and message.content
    assert reply.usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
    assert reply.usage.completion_tokens == 10

    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == message.content
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_sampling_with_a_seed_is_reproducible(client):
    def sample():
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95,
                                         seed=1234, extra_body={"ignore_eos": True}).choices[0].text
    assert sample() == sample()


def test_unknown_model_and_overlong_prompt_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT * 200, max_tokens=4)
    assert "prompt" in str(err.value)
