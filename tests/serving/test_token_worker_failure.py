"""A token worker that dies fails none of the requests it had not started: the prompt worker reports
that the KV could not be handed over, and the router runs the request again with another token
worker (it has produced nothing yet, so the client sees one ordinary answer)."""

import asyncio
import signal

import httpx
import pytest
from support.serving import manifest, start_cluster

pytestmark = pytest.mark.slow

REQUESTS = 16


def test_requests_survive_a_killed_token_worker(tiny_model_dir, tmp_path):
    cluster = start_cluster(manifest("token-failure", {"prompt": 1, "token": 2}), tiny_model_dir, tmp_path)
    try:
        victim = cluster.workers["token"][0]
        victim.proc.signal(signal.SIGKILL)
        victim.proc.popen.wait(10)

        async def send(client, i):
            body = {"model": "tiny", "prompt": f"request {i} after a token worker died", "max_tokens": 8,
                    "temperature": 0, "ignore_eos": True, "stream": i % 2 == 1}
            reply = await client.post(f"{cluster.base_url}/v1/completions", json=body)
            return reply.status_code, reply.text

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(send(client, i) for i in range(REQUESTS)))

        replies = asyncio.run(burst())
        failed = [(status, text[:300]) for status, text in replies if status != 200 or '"error"' in text]
        assert not failed, failed
    finally:
        cluster.stop(15)
