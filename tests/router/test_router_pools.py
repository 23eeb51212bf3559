"""Pool membership: PUT /admin/pools, dns: entries, and the `phasesplit router` command."""

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import openai
import pytest
from support.fake_worker import ADMIN_TOKEN, MODEL

from phasesplit.router.pools import WorkerSpec, parse_worker_list


async def request(cluster, method, path, body=None, headers=None):
    if method == "PUT" and headers is None:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as s, s.request(method, cluster.url + path, json=body,
                                                       headers=headers) as resp:
        return resp.status, await resp.json()


async def complete(base_url):
    return await openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0).completions.create(
        model=MODEL, prompt="hello", max_tokens=2)


async def test_put_admin_pools_changes_membership(make_cluster, spare_worker):
    cluster = await make_cluster(prompt=0, token=0, mixed=1)
    (first,) = cluster.workers["mixed"]
    await complete(cluster.base_url)

    status, body = await request(cluster, "PUT", "/admin/pools/mixed", {"workers": [spare_worker.address]})
    assert status == 200
    assert [w["address"] for w in body["workers"]] == [spare_worker.address] and body["workers"][0]["routable"]
    await complete(cluster.base_url)

    assert (len(first.generates), len(spare_worker.generates)) == (1, 1)
    metrics = await cluster.metrics()
    assert metrics[("phasesplit_pool_workers", (("pool", "mixed"),))] == 1
    assert [name for name, labels in metrics if ("worker", first.address) in labels] == [], \
        "no series names a worker that left the pool"


async def test_health_follows_membership(make_cluster, spare_worker):
    cluster = await make_cluster(prompt=0, token=0, mixed=0)
    status, body = await request(cluster, "GET", "/health")
    assert status == 503 and "mixed pool: no workers" in body["reason"]

    assert (await request(cluster, "PUT", "/admin/pools/mixed", {"workers": [spare_worker.address]}))[0] == 200
    status, body = await request(cluster, "GET", "/health")
    assert status == 200 and body["route"] == "mixed"

    assert (await request(cluster, "PUT", "/admin/pools/mixed", {"workers": []}))[0] == 200
    assert (await request(cluster, "GET", "/health"))[0] == 503


@pytest.mark.parametrize("path,body,status,param", [
    ("/admin/pools/mixed", {"workers": ["no-port"]}, 400, "workers[0]"),
    ("/admin/pools/mixed", {"workers": ["h:1", "h:99999"]}, 400, "workers[1]"),
    ("/admin/pools/mixed", {"members": []}, 400, "workers"),
    ("/admin/pools/decode", {"workers": []}, 404, "pool"),
])
async def test_bad_pool_update_names_the_problem(make_cluster, path, body, status, param):
    cluster = await make_cluster()
    got, reply = await request(cluster, "PUT", path, body)
    assert got == status and reply["error"]["param"] == param
    assert (await request(cluster, "GET", "/health"))[0] == 200


async def test_admin_needs_the_api_key_when_set(make_cluster):
    cluster = await make_cluster(api_key="k")
    assert (await request(cluster, "GET", "/admin/pools"))[0] == 401
    assert (await request(cluster, "GET", "/admin/pools", headers={"Authorization": "Bearer k"}))[0] == 200


async def test_repointing_a_pool_needs_the_admin_token_not_the_api_key(make_cluster, spare_worker):
    cluster = await make_cluster(api_key="k")
    for headers in ({}, {"Authorization": "Bearer k"}):  # a client, even with the API key, cannot
        status, reply = await request(cluster, "PUT", "/admin/pools/mixed", {"workers": [spare_worker.address]},
                                      headers=headers)
        assert status == 401 and reply["error"]["code"] == "invalid_admin_token"
    assert (await request(cluster, "PUT", "/admin/pools/mixed", {"workers": [spare_worker.address]}))[0] == 200
    closed = await make_cluster(admin_token=None)  # as the operator starts it: administration off
    status, reply = await request(closed, "PUT", "/admin/pools/mixed", {"workers": [spare_worker.address]})
    assert status == 403 and "PHASESPLIT_ADMIN_TOKEN" in reply["error"]["message"]


async def test_dns_entry_resolves_to_the_workers_behind_the_name(make_cluster, spare_worker):
    port = spare_worker.address.rsplit(":", 1)[1]
    cluster = await make_cluster(prompt=0, token=0, mixed=0, extra_specs={"mixed": [f"dns:localhost:{port}"]})
    status, pools = await request(cluster, "GET", "/admin/pools")
    assert pools["mixed"]["specs"] == [f"dns:localhost:{port}"]
    assert f"127.0.0.1:{port}" in [w["address"] for w in pools["mixed"]["workers"]]
    reply = await complete(cluster.base_url)
    assert reply.usage.completion_tokens == 2 and len(spare_worker.generates) == 1


@pytest.mark.parametrize("entry,spec", [
    ("10.0.0.1:50051", WorkerSpec("10.0.0.1", 50051)),
    ("dns:prompt.ns.svc.cluster.local:50051", WorkerSpec("prompt.ns.svc.cluster.local", 50051, dns=True)),
    ("[::1]:7", WorkerSpec("::1", 7)),
])
def test_worker_spec_parses(entry, spec):
    assert WorkerSpec.parse(entry) == spec
    assert str(spec) == entry


@pytest.mark.parametrize("entry", ["host", "host:", ":80", "host:0", "host:abc", "dns:name"])
def test_worker_spec_rejects(entry):
    with pytest.raises(ValueError, match="host:port or dns:NAME:PORT"):
        WorkerSpec.parse(entry)


def test_worker_list_skips_empty_entries():
    assert parse_worker_list("a:1, b:2,") == [WorkerSpec("a", 1), WorkerSpec("b", 2)]
    assert parse_worker_list("") == []


async def test_router_command_serves_and_stops_on_sigterm(tiny_model_dir, spare_worker):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "phasesplit.cli", "router", "--model", str(tiny_model_dir), "--served-model-name",
        MODEL, "--host", "127.0.0.1", "--port", "0", "--mixed-workers", spare_worker.address,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"PHASESPLIT_API_KEY": ""})
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "serving 'tiny'" in line, line + (await proc.stderr.read()).decode()
        base_url = line.split()[-1]
        reply = await complete(base_url)
        assert reply.usage.completion_tokens == 2
        async with aiohttp.ClientSession() as s, s.get(base_url.removesuffix("/v1") + "/v1/models") as resp:
            assert (await resp.json())["data"][0]["max_model_len"] == 2048   # config.json's max_position_embeddings
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_router_command_rejects_a_bad_worker_entry(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "phasesplit.cli", "router", "--model", str(tiny_model_dir),
                             "--prompt-workers", "nohost"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "'nohost'" in result.stderr
