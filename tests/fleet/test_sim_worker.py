"""Simulated workers (`--engine sim`): real processes, real gRPC and router, the engine's scheduler
and KV blocks, iteration times from the performance model."""

import json
import time
import urllib.request

import pytest

from phasesplit.engine.engine import EngineConfig, SamplingParams
from phasesplit.fleet.perf import Profiles
from phasesplit.fleet.sim_engine import SimEngine
from phasesplit.local import plan as local_plan
from support.serving import start_cluster, worker_load

MODEL, HARDWARE, TP = "llama2-70b", "h100-80gb", 8
SCALE = 4.0            # slow motion: every modelled second lasts four
PROMPT, OUTPUT = 6000, 12


def sim_manifest(pools: dict[str, int]) -> dict:
    return {
        "apiVersion": "phasesplit.io/v1alpha1", "kind": "SplitInference", "metadata": {"name": "sim"},
        "spec": {
            "model": {"name": "sim", "source": {"hostPath": {"path": "/unused"}}, "maxModelLen": 16384,
                      "simulated": {"model": MODEL, "hardware": HARDWARE, "tensorParallel": TP, "timeScale": SCALE}},
            "pools": {pool: {"replicas": n} for pool, n in pools.items()},
            "kvTransfer": {"timeoutSeconds": 30},
        },
    }


def complete(base_url: str, prompt: list[int], max_tokens: int) -> dict:
    body = json.dumps({"model": "sim", "prompt": prompt, "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"{base_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def test_local_mode_passes_the_simulated_engine_to_every_pool(tiny_model_dir):
    doc = sim_manifest({"prompt": 1, "token": 2})
    doc["spec"]["model"]["simulated"]["poolHardware"] = {"token": "a100-80gb"}
    plan = local_plan.build_plan(local_plan.validate_manifest(doc), str(tiny_model_dir))
    prompt, token = plan.pools["prompt"].worker_args, plan.pools["token"].worker_args
    assert prompt[prompt.index("--engine") + 1] == "sim" and token[token.index("--engine") + 1] == "sim"
    assert prompt[prompt.index("--sim-hardware") + 1] == HARDWARE
    assert token[token.index("--sim-hardware") + 1] == "a100-80gb"
    assert plan.router_args[plan.router_args.index("--max-model-len") + 1] == "16384"


def test_a_bad_simulated_source_is_refused_naming_the_field():
    doc = sim_manifest({"prompt": 1, "token": 1})
    doc["spec"]["model"]["simulated"]["timeScale"] = 0
    with pytest.raises(ValueError, match="timeScale"):
        local_plan.validate_manifest(doc)


def test_sim_engine_batches_with_the_engine_scheduler_and_frees_its_blocks(tiny_model_dir):
    perf = Profiles().get(MODEL, HARDWARE, TP)
    engine = SimEngine(EngineConfig(str(tiny_model_dir), max_model_len=8192), perf, num_layers=80,
                       time_scale=0.01)
    for i in range(3):
        engine.add_request(f"r{i}", [7] * 1000, SamplingParams(max_tokens=5))
    first = engine.step()
    assert [out.request_id for out in first] == ["r0", "r1"]  # the 2048-token budget takes two 1000-token prompts
    outputs = {out.request_id: list(out.token_ids) for out in first}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    assert sorted(outputs) == ["r0", "r1", "r2"] and all(len(t) == 5 for t in outputs.values())
    assert outputs["r0"] == outputs["r1"]  # deterministic tokens
    assert engine.num_used_blocks == 0 and engine.num_total_blocks == perf.kv_capacity_tokens // 16


def test_sim_engine_chunks_a_long_prompt_and_computes_only_what_its_prefix_cache_lacks(tiny_model_dir):
    """A 5,000-token prompt with a 2,048-token budget takes three steps priced as chunks over their
    context; the same prompt again is served from the prefix cache but for its last block."""
    perf = Profiles().get(MODEL, HARDWARE, TP)
    engine = SimEngine(EngineConfig(str(tiny_model_dir), max_model_len=8192, max_num_batched_tokens=2048), perf,
                       num_layers=80, time_scale=0.001)
    prompt, params = [i % 500 for i in range(5000)], SamplingParams(max_tokens=1)
    engine.add_request("first", prompt, params, prefill_only=True)
    steps = [engine.step() for _ in range(3)]
    assert [[out.request_id for out in step] for step in steps] == [[], [], ["first"]]
    assert engine.prefilled["first"][1] == pytest.approx(
        perf.prompt_time(2048) + perf.mixed_time([(2048, 2048)], 0) + perf.mixed_time([(4096, 904)], 0))
    engine.add_request("again", prompt, params, prefill_only=True)
    (again,) = engine.step()
    cached = (len(prompt) - 1) // 16 * 16
    assert again.num_cached_tokens == cached
    assert engine.prefilled["again"][1] == pytest.approx(perf.mixed_time([(cached, len(prompt) - cached)], 0))
    for rid in ("first", "again"):
        engine.release(rid)
    assert engine.num_used_blocks == 0


def test_a_request_through_the_router_takes_the_modelled_time_and_frees_its_kv(tiny_model_dir, tmp_path):
    cluster = start_cluster(sim_manifest({"prompt": 1, "token": 1}), tiny_model_dir, tmp_path / "logs")
    try:
        perf = Profiles().get(MODEL, HARDWARE, TP)
        prefill = perf.prompt_time(PROMPT) * SCALE
        decode = (OUTPUT - 1) * perf.token_time(1) * SCALE
        start = time.monotonic()
        reply = complete(cluster.base_url, [9] * PROMPT, OUTPUT)
        elapsed = time.monotonic() - start
        assert reply["usage"] == {"prompt_tokens": PROMPT, "completion_tokens": OUTPUT,
                                  "total_tokens": PROMPT + OUTPUT, "prompt_tokens_details": {"cached_tokens": 0}}
        assert reply["choices"][0]["finish_reason"] == "length" and "fleet" in reply["choices"][0]["text"]
        assert elapsed >= 0.95 * (prefill + decode), (elapsed, prefill, decode)
        time.sleep(0.5)
        for pool in ("prompt", "token"):
            load = worker_load(cluster.addresses(pool)[0])
            assert load.kv_blocks_used == 0 and load.running_requests == 0 and load.pending_transfers == 0
    finally:
        cluster.stop(10)


def test_the_operator_makes_every_pool_simulated_on_its_own_hardware():
    from phasesplit.control.spec import SplitInference
    from phasesplit.operator import builders
    doc = sim_manifest({"prompt": 1, "token": 1})
    doc["spec"]["model"]["simulated"]["poolHardware"] = {"token": "a100-80gb"}
    spec = SplitInference.model_validate(doc).spec
    token = builders.worker_args(spec, "token", spec.pools.token)
    assert token[token.index("--engine") + 1] == "sim" and token[token.index("--sim-hardware") + 1] == "a100-80gb"
    router = builders.router_args(builders.Owner("sim", "ns", "uid"), spec)
    assert router[router.index("--max-model-len") + 1] == "16384"
