"""Bounded inputs: what a client sends costs the router little before it is refused. A prompt far longer
than the context is refused by its length in characters, untokenized; a body over the limit by its size;
a stop list by its count and lengths; a connection that sends its headers slowly is closed."""

import asyncio
import contextlib
import json
import time

import aiohttp
import pytest
from support.fake_worker import MODEL

from phasesplit.router.app import BODY_LIMIT_MIB


async def post(cluster, path: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
            cluster.base_url + path, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


def peak_rss_mib() -> float:
    """This process's peak resident memory since the last reset_peak_rss() (/proc, Linux)."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kib / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@pytest.mark.parametrize("path,field", [("/completions", "prompt"), ("/chat/completions", "messages")])
async def test_a_4_mib_prompt_is_refused_untokenized_fast_and_without_memory(make_cluster, path, field):
    cluster = await make_cluster(max_model_len=2048)
    text = "hello world " * (4 * 2**20 // 12)
    body = {"model": MODEL, "prompt": text} if field == "prompt" else \
        {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    data = json.dumps(body).encode()
    reset_peak_rss()
    before = peak_rss_mib()
    start = time.monotonic()
    status, reply = await post(cluster, path, data)
    elapsed = time.monotonic() - start
    grown = peak_rss_mib() - before
    assert status == 400 and reply["error"]["param"] == field, reply
    assert elapsed < 0.5 and grown < 50, f"the 400 took {elapsed:.2f} s; the router's memory grew by {grown:.0f} MiB"
    assert reply["error"]["code"] == "context_length_exceeded"
    assert "2048 tokens" in reply["error"]["message"] and "characters" in reply["error"]["message"]
    assert cluster.workers["prompt"][0].prefills == []


async def test_a_body_over_the_limit_is_a_413_naming_it(make_cluster):
    cluster = await make_cluster()
    data = json.dumps({"model": MODEL, "prompt": "x" * (BODY_LIMIT_MIB * 2**20)}).encode()
    status, reply = await post(cluster, "/completions", data)
    assert status == 413, reply
    assert f"{BODY_LIMIT_MIB} MiB" in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"
    status, _ = await post(cluster, "/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert status == 200


@pytest.mark.parametrize("stop,says", [
    (["x" * 1000] * 2000, "at most 16 stop strings"),
    ([f"s{i}" for i in range(17)], "at most 16 stop strings"),
    (["x" * 257], "at most 256 characters"),
], ids=["2000-stops", "17-stops", "257-characters"])
async def test_stop_lists_beyond_16_strings_of_256_characters_are_a_400(make_cluster, stop, says):
    cluster = await make_cluster()
    status, reply = await post(cluster, "/completions", {"model": MODEL, "prompt": "hi", "stop": stop})
    assert status == 400 and reply["error"]["param"] == "stop", reply
    assert says in reply["error"]["message"]


async def test_16_stop_strings_of_256_characters_pass(make_cluster):
    cluster = await make_cluster()
    stop = [f"{i:02d}" + "x" * 254 for i in range(16)]
    status, reply = await post(cluster, "/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stop": stop})
    assert status == 200, reply
    assert list(cluster.workers["token"][0].generates[0].sampling.stop) == stop


async def test_connections_that_send_headers_slowly_are_closed_at_the_header_timeout(make_cluster):
    cluster = await make_cluster(header_timeout=1.0)
    port = int(cluster.url.rsplit(":", 1)[1])

    async def slow_client() -> float:
        """Sends a header byte at a time, as long as the server keeps the connection; when it closed it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nX-Slow: ")
        closed = asyncio.ensure_future(reader.read())   # b"" at the server's close
        try:
            while not closed.done():
                writer.write(b"a")
                await asyncio.wait([closed], timeout=0.2)
        except ConnectionError:
            pass
        finally:
            writer.close()
        with contextlib.suppress(ConnectionError):   # a reset is a close too
            await closed
        return time.monotonic() - start

    held = await asyncio.wait_for(asyncio.gather(*(slow_client() for _ in range(200))), timeout=15)
    assert max(held) < 5, f"a slow connection was held {max(held):.1f} s"
    status, _ = await post(cluster, "/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert status == 200


async def test_a_body_sent_too_slowly_is_a_408(make_cluster):
    cluster = await make_cluster(body_timeout=0.5)
    port = int(cluster.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ")
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout=10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
