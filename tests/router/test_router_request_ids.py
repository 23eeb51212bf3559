"""Every answer names its request id (the client's X-Request-Id when sane), the router logs one access line per
request with it, and the workers get it with the request (gRPC metadata) for their own log lines."""

import logging

import aiohttp
import pytest
from support.fake_worker import MODEL

BODY = {"model": MODEL, "prompt": "hello", "max_tokens": 3}


async def post(cluster, body, headers=None):
    async with aiohttp.ClientSession() as s, s.post(cluster.url + "/v1/completions", json=body,
                                                    headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Request-Id")


def access_lines(caplog, request_id):
    return [r for r in caplog.records if r.name == "phasesplit.router.access" and r.request_id == request_id]


@pytest.mark.parametrize("pools", [{"prompt": 1, "token": 1}, {"prompt": 0, "token": 0, "mixed": 1}])
async def test_the_clients_request_id_comes_back_and_reaches_the_workers(make_cluster, caplog, pools):
    caplog.set_level(logging.INFO, logger="phasesplit.router.access")
    cluster = await make_cluster(**pools)
    status, echoed = await post(cluster, BODY, {"X-Request-Id": "trace-42.a"})
    assert status == 200 and echoed == "trace-42.a"
    assert all(w.log_ids == ["trace-42.a"] for w in cluster.all_workers())
    [line] = access_lines(caplog, "trace-42.a")
    assert line.levelno == logging.INFO
    assert line.getMessage().startswith("POST /v1/completions 200 ")
    assert "tokens_in=" in line.getMessage() and "tokens_out=3" in line.getMessage()


@pytest.mark.parametrize("sent", [None, "", "x" * 129, "bad id", "a;b", "<script>"])
async def test_a_missing_or_odd_request_id_is_replaced(make_cluster, sent):
    cluster = await make_cluster()
    status, echoed = await post(cluster, BODY, {"X-Request-Id": sent} if sent is not None else None)
    assert status == 200 and echoed and echoed != sent and len(echoed) <= 128
    assert all(w.log_ids == [echoed] for w in cluster.all_workers())


async def test_errors_and_streams_carry_the_request_id_too(make_cluster, caplog):
    caplog.set_level(logging.INFO, logger="phasesplit.router.access")
    cluster = await make_cluster()
    status, echoed = await post(cluster, BODY | {"max_tokens": 0}, {"X-Request-Id": "bad-one"})
    assert status == 400 and echoed == "bad-one"
    [line] = access_lines(caplog, "bad-one")
    assert " 400 " in line.getMessage() and "tokens_out=0" in line.getMessage()
    status, echoed = await post(cluster, BODY | {"stream": True}, {"X-Request-Id": "streamed"})
    assert status == 200 and echoed == "streamed"
    [line] = access_lines(caplog, "streamed")
    assert "tokens_out=3" in line.getMessage()


async def test_probes_and_scrapes_log_only_at_debug(make_cluster, caplog):
    caplog.set_level(logging.INFO, logger="phasesplit.router.access")
    cluster = await make_cluster()
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/metrics"):
            async with s.get(cluster.url + path) as resp:
                assert resp.status == 200 and resp.headers["X-Request-Id"]
    assert not [r for r in caplog.records if r.name == "phasesplit.router.access"]
