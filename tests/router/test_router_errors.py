"""Bad requests get OpenAI's error JSON with the right status, and the router keeps serving."""

import json

import aiohttp
import openai
import pytest
from support.fake_worker import MODEL

GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 3}


async def post(cluster, path, body, headers=None):
    data = body if isinstance(body, (bytes, str)) else None
    async with aiohttp.ClientSession() as s, s.post(cluster.url + path, data=data,
                                                    json=None if data is not None else body,
                                                    headers=headers) as resp:
        return resp.status, await resp.json()


def assert_openai_error(body, param=None, code=None):
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["param"] == param
    if code:
        assert body["error"]["code"] == code


@pytest.mark.parametrize("path,body,param,fragment", [
    ("/v1/completions", b"{not json", None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", None, "JSON object"),
    ("/v1/completions", GOOD | {"temperature": 5}, "temperature", "less than or equal to 2"),
    ("/v1/completions", GOOD | {"top_p": 0}, "top_p", "greater than 0"),
    ("/v1/completions", GOOD | {"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", GOOD | {"n": 2}, "n", "only n=1"),
    ("/v1/completions", GOOD | {"stop": 5}, "stop", "stop must be"),
    ("/v1/completions", GOOD | {"prompt": ["a", "b"]}, "prompt", "one prompt"),
    ("/v1/completions", {"prompt": "hi"}, "model", "required"),
    ("/v1/completions", GOOD | {"prompt": [5, 100000]}, "prompt", "outside the vocabulary"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     "messages[0].role", "'user'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "text content"),
    ("/v1/completions", GOOD | {"presence_penalty": 0.5}, "presence_penalty", "only 0 is allowed"),
    ("/v1/completions", GOOD | {"frequency_penalty": -1}, "frequency_penalty", "only 0 is allowed"),
    ("/v1/completions", GOOD | {"logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
    ("/v1/completions", GOOD | {"best_of": 3}, "best_of", "only best_of=1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format", "'json_object'"),
])
async def test_bad_body_is_a_400_naming_the_field(make_cluster, path, body, param, fragment):
    cluster = await make_cluster()
    status, reply = await post(cluster, path, body)
    assert status == 400
    assert_openai_error(reply, param)
    assert reply["error"]["type"] == "invalid_request_error"
    assert fragment in reply["error"]["message"]
    status, reply = await post(cluster, "/v1/completions", GOOD)
    assert status == 200 and reply["usage"]["completion_tokens"] == 3


async def test_unknown_model_is_a_404(make_cluster):
    cluster = await make_cluster()
    with pytest.raises(openai.NotFoundError) as e:
        await openai.AsyncOpenAI(base_url=cluster.base_url, api_key="x").completions.create(
            model="gpt-nonexistent", prompt="hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 200}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 200}]},
     "messages"),
])
async def test_prompt_over_the_maximum_length_is_a_400(make_cluster, path, body, param):
    cluster = await make_cluster(max_model_len=64)
    status, reply = await post(cluster, path, body)
    assert status == 400
    assert_openai_error(reply, param, code="context_length_exceeded")
    assert "64" in reply["error"]["message"]
    assert cluster.workers["prompt"][0].prefills == []


async def test_max_tokens_beyond_the_context_is_a_400_naming_it(make_cluster):
    cluster = await make_cluster(max_model_len=64)
    status, reply = await post(cluster, "/v1/completions", GOOD | {"max_tokens": 100})
    assert status == 400
    assert_openai_error(reply, "max_tokens", code="context_length_exceeded")


async def test_api_key_is_required_when_set(make_cluster):
    cluster = await make_cluster(api_key="sekrit")
    with pytest.raises(openai.AuthenticationError) as e:
        await openai.AsyncOpenAI(base_url=cluster.base_url, api_key="wrong", max_retries=0).models.list()
    assert e.value.code == "invalid_api_key"
    status, reply = await post(cluster, "/v1/completions", GOOD)
    assert status == 401
    assert_openai_error(reply, code="invalid_api_key")
    status, _ = await post(cluster, "/v1/completions", GOOD, headers={"Authorization": "Bearer sekrit"})
    assert status == 200
    async with aiohttp.ClientSession() as s, s.get(cluster.url + "/health") as resp:
        assert resp.status == 200, "probes need no key"


async def test_no_worker_is_a_503_and_health_says_why(make_cluster):
    cluster = await make_cluster(prompt=1, token=0)
    status, reply = await post(cluster, "/v1/completions", GOOD)
    assert status == 503
    assert_openai_error(reply)
    async with aiohttp.ClientSession() as s, s.get(cluster.url + "/health") as resp:
        assert resp.status == 503
        assert "token pool: no workers" in (await resp.json())["reason"]


async def test_unknown_path_is_an_openai_404(make_cluster):
    cluster = await make_cluster()
    async with aiohttp.ClientSession() as s, s.get(cluster.url + "/v1/nothing") as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json())


async def test_worker_dying_mid_stream_ends_the_stream_with_an_error(make_cluster):
    cluster = await make_cluster(worker_options={"token_delay": 0.05})
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    events = []
    async with aiohttp.ClientSession() as s, s.post(cluster.url + "/v1/completions", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                if len(events) == 3:
                    await cluster.workers["token"][0].stop()
    assert events[-1] == b"[DONE]"
    assert_openai_error(json.loads(events[-2]))
    metrics = await cluster.metrics()
    assert metrics[("phasesplit_requests_total", (("model_name", MODEL), ("outcome", "error")))] == 1
    assert metrics[("phasesplit_inflight_requests", (("pool", "token"),))] == 0


JARGON = ("Input should", "Value error", "after validation", "Extra inputs", "String should", "validation error")


@pytest.mark.parametrize("path,body,param,message", [
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages", "messages: must have at least 1 item"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, "messages", "messages: must be a list, got 'hi'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [5]}, "messages[0]",
     "messages[0]: must be an object of fields, got 5"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "messages[0].role: must be one of 'system', 'developer', 'user', 'assistant' or 'tool', got 'robot'"),
    ("/v1/completions", GOOD | {"temperature": 5}, "temperature",
     "temperature: must be less than or equal to 2.0, got 5"),
    ("/v1/completions", GOOD | {"max_tokens": "x"}, "max_tokens", "max_tokens: must be an integer, got 'x'"),
    ("/v1/completions", GOOD | {"max_tokens": 1.5}, "max_tokens", "max_tokens: must be a whole number, got 1.5"),
    ("/v1/completions", GOOD | {"stream": "maybe"}, "stream", "stream: must be true or false, got 'maybe'"),
    ("/v1/completions", GOOD | {"model": 5}, "model", "model: must be a string, got 5"),
    ("/v1/completions", GOOD | {"logit_bias": {"1": 2}}, "logit_bias", "logit_bias: logit_bias is not supported"),
])
async def test_400_messages_say_what_is_allowed_in_plain_words(make_cluster, path, body, param, message):
    cluster = await make_cluster()
    status, reply = await post(cluster, path, body)
    assert status == 400 and reply["error"]["param"] == param
    assert reply["error"]["message"].startswith(message)
    assert not any(word in reply["error"]["message"] for word in JARGON), reply["error"]["message"]
