"""Local mode scales each pool on its own queue, end to end: `phasesplit local` as a real process
(router and workers as its children, the tiny model), driven over the OpenAI HTTP API, observed
through the router's `GET /admin/pools` and the launcher's log."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import re
import subprocess
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
import yaml
from support import prom

from support.examples import split_inference

from phasesplit.control.scaling import SplitScaler
from phasesplit.local.autoscaler import enabled
from phasesplit.local.launcher import parse_args
from phasesplit.local.plan import build_plan, validate_manifest
from phasesplit.local.processes import free_port, phasesplit_argv

FAST = {"minReplicas": 1, "maxReplicas": 2, "metric": "queueTokens", "scaleUpMaxStep": 1,
        "scaleDownStabilizationSeconds": 3, "cooldownSeconds": 2}
ENGINE = {"numKvBlocks": 1024, "maxNumBatchedTokens": 2048}


def manifest(mode: str = "builtin") -> dict:
    return split_inference("autoscale", spec={
        "model": {"source": {"hostPath": {"path": "/unused"}}, "maxModelLen": 2048},
        "autoscaling": {"mode": mode, "intervalSeconds": 30},
        "pools": {
            # a long prompt is ~1000 tokens: 8 of them in the prompt phase ask for more than 1 replica
            "prompt": {"replicas": 1, "autoscaling": {**FAST, "targetPerReplica": 1000}, "engine": ENGINE},
            # tokens still to generate: 8 answers of 150 tokens ask for more than 1 replica
            "token": {"replicas": 1, "autoscaling": {**FAST, "targetPerReplica": 300}, "engine": ENGINE},
        }})


LONG_PROMPT = (pathlib.Path(__file__).resolve().parents[2] / "worker" / "phasesplit" / "data" / "prose.txt").read_text()[:2400]
PROMPT_BURST = dict(prompt=LONG_PROMPT, max_tokens=1, clients=8)
DECODE_BURST = dict(prompt="Hello there", max_tokens=150, clients=8)
TRICKLE = dict(prompt="Hi", max_tokens=20, clients=2)


@dataclass
class Traffic:
    sent: int = 0
    ok: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class LocalMode:
    url: str
    proc: subprocess.Popen
    log_path: pathlib.Path
    sizes: list[tuple[str, int, int]] = field(default_factory=list)  # (phase, prompt, token) as observed
    phase: str = "start"

    async def pools(self, session: aiohttp.ClientSession) -> tuple[int, int]:
        async with session.get(f"{self.url}/admin/pools") as resp:
            body = await resp.json()
        return len(body["prompt"]["workers"]), len(body["token"]["workers"])

    def seen(self, phase: str) -> list[tuple[int, int]]:
        return [(p, t) for ph, p, t in self.sizes if ph == phase]


@contextlib.contextmanager
def running_local(doc: dict, tiny_model_dir, tmp_path, *extra: str):
    """`phasesplit local` on `doc` as a real process, until it prints its OpenAI endpoint."""
    path = tmp_path / "autoscale.yaml"
    path.write_text(yaml.safe_dump(doc))
    port = free_port()
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            phasesplit_argv("local", str(path), "--model", str(tiny_model_dir), "--port", str(port),
                            "--autoscale-interval", "0.5", "--log-dir", str(tmp_path / "logs"), *extra),
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "OpenAI endpoint" not in log_path.read_text():
            assert proc.poll() is None, f"local mode exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"local mode not ready:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield LocalMode(f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def local_mode(tiny_model_dir, tmp_path):
    with running_local(manifest(), tiny_model_dir, tmp_path, "--drain-timeout", "20") as lm:
        yield lm


async def client(session, url: str, load: dict, stop: asyncio.Event, traffic: Traffic) -> None:
    body = {"model": "tiny", "prompt": load["prompt"], "max_tokens": load["max_tokens"], "ignore_eos": True,
            "temperature": 0}
    while not stop.is_set():
        traffic.sent += 1
        body["cache_salt"] = f"request-{traffic.sent}"  # every prompt computed whole: the prefix cache shares none
        try:
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                reply = await resp.json()
        except aiohttp.ClientError as e:
            traffic.failures.append(f"{type(e).__name__}: {e}")
            continue
        if resp.status == 200 and reply["usage"]["completion_tokens"] == load["max_tokens"]:
            traffic.ok += 1
        else:
            traffic.failures.append(f"HTTP {resp.status}: {reply}")


async def run_phase(lm: LocalMode, session, name: str, load: dict, traffic: Traffic,
                    until, timeout: float, then: float = 0.0) -> None:
    """Runs `load` until `until(prompt, token)` holds (then `then` seconds more), recording pool sizes."""
    lm.phase = name
    stop = asyncio.Event()
    clients = [asyncio.create_task(client(session, lm.url, load, stop, traffic)) for _ in range(load["clients"])]
    deadline = time.monotonic() + timeout
    try:
        reached = None
        while True:
            sizes = await lm.pools(session)
            lm.sizes.append((name, *sizes))
            now = time.monotonic()
            if reached is None and until(*sizes):
                reached = now
            if reached is not None and now >= reached + then:
                return
            assert now < deadline, f"{name}: pools still (prompt, token) = {sizes} after {timeout:g} s"
            await asyncio.sleep(0.25)
    finally:
        stop.set()
        await asyncio.gather(*clients)


async def router_outcomes(lm: LocalMode, session) -> dict[str, float]:
    async with session.get(f"{lm.url}/metrics") as resp:
        text = await resp.text()
    return {dict(labels)["outcome"]: v for (name, labels), v in prom.parse(text).items()
            if name == "phasesplit_requests_total"}


async def scenario(lm: LocalMode) -> Traffic:
    traffic = Traffic()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        assert await lm.pools(session) == (1, 1)
        await run_phase(lm, session, "prompt burst", PROMPT_BURST, traffic, lambda p, t: p == 2, 90, then=3)
        # the prompt pool shrinks while requests still flow through it
        await run_phase(lm, session, "after prompt burst", TRICKLE, traffic, lambda p, t: p == 1, 30)
        await run_phase(lm, session, "decode burst", DECODE_BURST, traffic, lambda p, t: t == 2, 90, then=3)
        await run_phase(lm, session, "after decode burst", TRICKLE, traffic, lambda p, t: t == 1, 30, then=2)
        outcomes = await router_outcomes(lm, session)
    assert outcomes.get("success") == traffic.sent, outcomes
    assert outcomes.get("error", 0) == outcomes.get("rejected", 0) == outcomes.get("cancelled", 0) == 0, outcomes
    return traffic


def test_each_pool_follows_its_own_load_and_shrinks_back_without_failing_a_request(local_mode):
    lm = local_mode
    traffic = asyncio.run(scenario(lm))

    assert traffic.failures == [] and traffic.ok == traffic.sent > 0, traffic.failures[:5]
    assert max(t for _, t in lm.seen("prompt burst")) == 1, "long prompts with 1-token answers leave the token pool alone"
    assert max(p for p, _ in lm.seen("decode burst")) == 1, "long answers leave the prompt pool alone"
    assert lm.seen("after decode burst")[-1] == (1, 1), "both pools back at their minimum"

    log = lm.log_path.read_text()
    decisions = re.findall(r"(prompt|token) pool: (\d) -> (\d) replicas \(queueTokens=[\d.e+]+\): (.+)", log)
    changes = [(pool, int(a), int(b)) for pool, a, b, _ in decisions]
    assert changes == [("prompt", 1, 2), ("prompt", 2, 1), ("token", 1, 2), ("token", 2, 1)], log
    assert all("target" in reason for *_, reason in decisions)
    stopped = r"(prompt|token)-\d+ stopped \(exit code 0\)"
    deadline = time.monotonic() + 30
    while len(re.findall(stopped, log)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        log = lm.log_path.read_text()
    assert sorted(re.findall(stopped, log)) == ["prompt", "token"], "the removed workers drained and exited 0"


# ---- without processes ----

def test_mode_none_and_hpa_leave_local_pools_alone(tiny_model_dir):
    assert enabled(build_plan(validate_manifest(manifest("builtin")), str(tiny_model_dir)))
    for mode in ("none", "hpa"):
        assert not enabled(build_plan(validate_manifest(manifest(mode)), str(tiny_model_dir)))


def test_local_scaler_takes_the_pools_knobs_from_the_spec(tiny_model_dir):
    scaler = SplitScaler.from_spec(build_plan(validate_manifest(manifest()), str(tiny_model_dir)).spec)
    prompt, token = scaler.pools["prompt"].knobs, scaler.pools["token"].knobs
    assert (prompt.target_per_replica, token.target_per_replica) == (1000, 300)
    assert (prompt.max_replicas, prompt.scale_down_stabilization_seconds, prompt.cooldown_seconds) == (2, 3, 2)


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_autoscale_interval_must_be_positive_seconds(value, capsys):
    with pytest.raises(SystemExit):
        parse_args(["x.yaml", "--autoscale-interval", value])
    assert "--autoscale-interval" in capsys.readouterr().err


def test_a_token_pool_at_zero_comes_up_on_the_first_request(tiny_model_dir, tmp_path):
    doc = manifest()
    doc["spec"]["autoscaling"]["intervalSeconds"] = 1
    doc["spec"]["pools"]["token"]["replicas"] = 0
    doc["spec"]["pools"]["token"]["autoscaling"]["minReplicas"] = 0

    async def first_request(lm: LocalMode) -> tuple[int, dict, int]:
        async with aiohttp.ClientSession() as session:
            before = (await lm.pools(session))[1]
            body = {"model": doc["spec"]["model"]["name"], "prompt": "Hi", "max_tokens": 4}
            async with session.post(f"{lm.url}/v1/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=110)) as resp:
                return resp.status, await resp.json(), before

    with running_local(doc, tiny_model_dir, tmp_path) as lm:
        status, body, before = asyncio.run(first_request(lm))
        assert before == 0, "the token pool starts with no worker"
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 4
        assert "token pool: 0 -> 1 replicas" in lm.log_path.read_text()
