"""The official openai client against the router: completions and chat, streaming and not, with usage."""

import openai
import pytest
from support.fake_worker import MODEL, expected_output, next_token

PROMPT = "The quick brown fox jumps over the lazy dog"


def client(cluster, api_key="unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cluster.base_url, api_key=api_key, max_retries=0)


@pytest.mark.parametrize("pools", [{"prompt": 1, "token": 1}, {"prompt": 0, "token": 0, "mixed": 1}],
                         ids=["split", "mixed"])
async def test_completion_returns_the_workers_tokens_and_usage(make_cluster, tokenizer, pools):
    cluster = await make_cluster(**pools)
    prompt_ids = tokenizer.encode(PROMPT)
    want = expected_output(prompt_ids, 7)

    reply = await client(cluster).completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, extra_body={"ignore_eos": True})

    assert reply.choices[0].text == "".join(tokenizer.decode([t]) for t in want)
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        len(prompt_ids), 7, len(prompt_ids) + 7)
    served_by = "mixed" if pools.get("mixed") else "token"
    assert [g.request_id for g in cluster.workers[served_by][0].generates] == [reply.id]


async def test_split_route_prefills_on_the_prompt_worker_and_decodes_on_the_token_worker(make_cluster):
    cluster = await make_cluster(prompt=1, token=1)
    await client(cluster).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    (prefill,) = cluster.workers["prompt"][0].prefills
    (generate,) = cluster.workers["token"][0].generates
    assert prefill.token_worker == cluster.workers["token"][0].address
    assert generate.request_id == prefill.request_id and not generate.prompt_token_ids
    assert prefill.sampling.max_tokens == 4 and prefill.sampling.ignore_eos
    assert generate.HasField("first_token") and generate.first_token == next_token(list(prefill.prompt_token_ids))


async def test_streamed_completion_ends_with_usage(make_cluster, tokenizer):
    cluster = await make_cluster()
    prompt_ids = tokenizer.encode(PROMPT)
    want = expected_output(prompt_ids, 6)

    stream = await client(cluster).completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, extra_body={"ignore_eos": True},
                                                      stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]

    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == "".join(tokenizer.decode([t]) for t in want)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    metrics = await cluster.metrics()
    assert metrics[("phasesplit_requests_total", (("model_name", MODEL), ("outcome", "success")))] == 1
    assert metrics[("phasesplit_request_latency_seconds_count", (("model_name", MODEL), ("pool", "token")))] == 1
    assert cluster.workers["token"][0].aborted == [] and cluster.workers["prompt"][0].aborted == []


async def test_chat_completion_uses_the_chat_template(make_cluster, tokenizer):
    cluster = await make_cluster()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    want = expected_output(prompt_ids, 9)

    reply = await client(cluster).chat.completions.create(model=MODEL, messages=messages,
                                                          max_completion_tokens=9, extra_body={"ignore_eos": True})

    assert list(cluster.workers["prompt"][0].prefills[0].prompt_token_ids) == prompt_ids
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "".join(tokenizer.decode([t]) for t in want)
    assert reply.usage.prompt_tokens == len(prompt_ids) and reply.usage.completion_tokens == 9


async def test_streamed_chat_stops_at_eos(make_cluster, tokenizer):
    cluster = await make_cluster()
    messages = [{"role": "user", "content": "Hello there"}]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    want = expected_output(prompt_ids, 200, eos=set(tokenizer.eos_token_ids))
    assert len(want) < 200, "the echoed chat prompt must contain an EOS token"

    stream = await client(cluster).chat.completions.create(model=MODEL, messages=messages, max_tokens=200,
                                                           stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "".join(tokenizer.decode([t]) for t in want)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(want)


async def test_request_ending_at_its_first_token_skips_generate(make_cluster):
    cluster = await make_cluster()
    reply = await client(cluster).completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    assert reply.usage.completion_tokens == 1 and reply.choices[0].finish_reason == "length"
    assert cluster.workers["token"][0].generates == []
    assert cluster.workers["token"][0].kv == {}


async def test_models_lists_the_served_model(make_cluster):
    cluster = await make_cluster()
    models = await client(cluster).models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_a_model_is_retrieved_by_name_and_an_unknown_one_is_not_found(make_cluster):
    cluster = await make_cluster()
    card = await client(cluster).models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "phasesplit")
    with pytest.raises(openai.NotFoundError) as err:
        await client(cluster).models.retrieve("gpt-4")
    assert err.value.code == "model_not_found" and "'gpt-4' does not exist" in err.value.message


async def test_the_defaults_of_unsupported_options_are_accepted(make_cluster):
    cluster = await make_cluster()
    reply = await client(cluster).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, presence_penalty=0,
        frequency_penalty=0, logit_bias={}, response_format={"type": "text"})
    assert reply.usage.completion_tokens >= 1
