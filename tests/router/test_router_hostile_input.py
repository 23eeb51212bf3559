"""Hostile bodies never get a 5xx: each is refused with a 400 naming what is wrong, and the router
keeps serving. Every field's bounds are those of the proto field it travels in. A property-based
search (Hypothesis) over the request models and over raw bodies finds no 5xx."""

import json

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fake_worker import MODEL

ENDPOINTS = ("/completions", "/chat/completions")


@pytest.fixture
async def router(make_cluster):
    cluster = await make_cluster(prompt=1, token=1)
    async with aiohttp.ClientSession() as session:
        yield cluster, session


async def post(router, path: str, body) -> tuple[int, dict]:
    cluster, session = router
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(cluster.base_url + path, data=data, headers={"Content-Type": "application/json"}) as r:
        # a body the search finds valid may ask for a stream: its answer is events, not one JSON object
        return r.status, await (r.json() if r.content_type == "application/json" else r.text())


async def still_serves(router) -> None:
    status, reply = await post(router, "/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert status == 200, reply


@pytest.mark.parametrize("body,param,says", [
    (b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
    ({"model": MODEL, "prompt": "x", "top_k": 1099511627776}, "top_k", "less than or equal to 2147483647"),
    ({"model": MODEL, "prompt": "x", "seed": 2**64}, "seed", "less than or equal to"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 2**32}, "max_tokens", "less than or equal to 4294967295"),
    ({"model": MODEL, "prompt": [1, 2**32]}, "prompt", "0..4294967295"),
    ({"model": MODEL, "prompt": "x\ud800y"}, "prompt", "lone surrogate"),
    ({"model": MODEL, "prompt": "x", "stop": ["\udfff"]}, "stop", "lone surrogate"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", None, "not valid JSON"),
], ids=["deep-json", "top_k-int32", "seed-uint64", "max_tokens-uint32", "token-id-uint32", "surrogate-prompt",
        "surrogate-stop", "huge-number"])
async def test_hostile_completion_bodies_get_a_400_naming_the_problem(router, body, param, says):
    status, reply = await post(router, "/completions", body)
    assert status == 400, reply
    assert says in reply["error"]["message"] and reply["error"]["param"] == param
    await still_serves(router)


async def test_a_lone_surrogate_in_a_chat_message_gets_a_400(router):
    status, reply = await post(router, "/chat/completions",
                               {"model": MODEL, "messages": [{"role": "user", "content": "hi \ud800"}]})
    assert status == 400 and reply["error"]["param"] == "messages[0].content"
    await still_serves(router)


INTS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**63, 2**64]))
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
JSON = st.recursive(st.none() | st.booleans() | INTS | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
FIELD = {"model": st.just(MODEL) | TEXT, "prompt": TEXT | st.lists(INTS, max_size=4) | JSON,
         "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                     "content": TEXT | JSON}), max_size=2) | JSON,
         "max_tokens": INTS | JSON, "max_completion_tokens": INTS, "temperature": st.floats() | INTS,
         "top_p": st.floats() | INTS, "top_k": INTS, "seed": INTS | JSON, "stop": TEXT | st.lists(TEXT, max_size=2),
         "stream": st.booleans() | JSON, "n": INTS, "ignore_eos": JSON, "logprobs": JSON,
         "stream_options": JSON}
BODIES = st.fixed_dictionaries({}, optional=FIELD)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, endpoint=st.sampled_from(ENDPOINTS))
async def test_no_request_model_gets_a_5xx(router, body, endpoint):
    status, _ = await post(router, endpoint, json.dumps(body, allow_nan=True).encode())
    assert status < 500, body


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()), endpoint=st.sampled_from(ENDPOINTS))
async def test_no_raw_body_gets_a_5xx(router, raw, endpoint):
    status, _ = await post(router, endpoint, raw)
    assert status < 500, raw
