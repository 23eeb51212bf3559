"""Prefix caching in the simulator: the LRU block cache, Mooncake traces, cache-aware routing."""

import gzip
import json
from types import SimpleNamespace

import pytest

from phasesplit.cli import main as cli
from phasesplit.router.cache_routing import pick_cache_aware, pick_cache_aware_token, prefill_locally
from phasesplit.fleet.perf import Profiles
from phasesplit.fleet.prefix_cache import PrefixCache, cached_tokens, pooled_hit_ratio
from phasesplit.fleet.report import summarize
from phasesplit.router.scheduling import pick_mixed_worker, pick_prompt_worker
from phasesplit.fleet.sim import PoolSpec, SimConfig, simulate
from phasesplit.fleet.trace import load_trace, redraw


def test_the_cache_serves_the_leading_run_and_evicts_tails_before_heads():
    cache = PrefixCache(4)
    cache.insert([1, 2, 3])
    assert cache.match([1, 2, 3, 4]) == 3 and cache.match([5, 2]) == 0
    cache.insert([1, 9])            # shares block 1; 3 (the oldest tail) must go first
    assert len(cache) == 4 and cache.match([1, 2, 3]) == 3
    cache.insert([7])
    assert cache.match([1, 2, 3]) == 2 and cache.match([1, 9]) == 2
    empty = PrefixCache(0)
    empty.insert([1])
    assert empty.match([1]) == 0


def test_a_hit_never_skips_the_last_token_and_the_pooled_bound_counts_repeats():
    assert cached_tokens(2, 1024, 512) == 1023 and cached_tokens(1, 1024, 512) == 512
    prompts = [([1, 2], 1024), ([1, 2, 3], 1500), ([4], 100)]
    assert pooled_hit_ratio(prompts, 10, 512) == pytest.approx(1024 / 2624)
    assert pooled_hit_ratio(prompts, 0, 512) == 0.0


def test_bundled_mooncake_traces_load_with_their_block_hashes():
    conv, synthetic = load_trace("mooncake-conv"), load_trace("mooncake-synthetic")
    assert (len(conv), len(synthetic)) == (12031, 3993)
    assert all(len(b) == -(-int(n) // 512) for b, n in zip(conv.blocks[:100], conv.prompt[:100]))
    assert conv.arrival[0] == 0 and 3000 < conv.arrival[-1] < 4000   # about an hour, in seconds
    again = redraw(conv, 10.0, 500, seed=1)
    assert again.blocks == conv.blocks[:500] and 8 < again.rate < 12


@pytest.mark.parametrize("row, message", [
    ({"timestamp": 0, "input_length": 10, "output_length": 1}, "missing field(s) hash_ids"),
    ({"timestamp": 0, "input_length": 1025, "output_length": 1, "hash_ids": [1, 2]}, "2 hash_ids for 1025"),
    ({"timestamp": 0, "input_length": "x", "output_length": 1, "hash_ids": [1]},
     "input_length, output_length must be numbers"),
])
def test_a_bad_mooncake_line_is_named(tmp_path, row, message):
    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]}) + "\n")
        f.write(json.dumps(row) + "\n")
    with pytest.raises(ValueError) as error:
        load_trace(path)
    assert "line 2: " in str(error.value) and message in str(error.value)


def worker(name, queued=0, inflight=0, free_blocks=100, block_size=16, max_batch=64):
    return SimpleNamespace(address=name, routable=True, queued_prompt_tokens=queued, inflight=inflight,
                           free_blocks=free_blocks, block_size=block_size, max_batch=max_batch,
                           busy_slots=inflight, last_picked=0)


def test_cache_aware_goes_where_the_prefix_is_unless_the_queue_there_costs_more():
    warm, cold = worker("warm", queued=3000), worker("cold", queued=0)
    held = {"warm": 4000, "cold": 0}
    assert pick_cache_aware([warm, cold], lambda w: held[w.address], 5000, pick_prompt_worker) is warm
    warm.queued_prompt_tokens = 5000
    assert pick_cache_aware([warm, cold], lambda w: held[w.address], 5000, pick_prompt_worker) is cold


def test_a_short_shared_prefix_or_a_busy_machine_does_not_steer_the_pick():
    seen, fresh = worker("seen", inflight=3), worker("fresh", inflight=0)
    held = {"seen": 512, "fresh": 0}   # a system prompt: a tenth of the prompt
    assert pick_cache_aware([seen, fresh], lambda w: held[w.address], 5000, pick_mixed_worker) is fresh
    held["seen"] = 4500
    assert pick_cache_aware([seen, fresh], lambda w: held[w.address], 5000, pick_mixed_worker) is seen
    seen.inflight = 20   # far busier than the least busy: balance first
    assert pick_cache_aware([seen, fresh], lambda w: held[w.address], 5000, pick_mixed_worker) is fresh


def test_cache_aware_token_pick_keeps_a_conversation_where_it_decoded_while_there_is_room():
    home, other = worker("home", inflight=10), worker("other", inflight=0)
    held = {"home": 900, "other": 0}
    assert pick_cache_aware_token([home, other], lambda w: held[w.address], 1000) is home
    held["home"] = 300   # less than half: join the shortest queue
    assert pick_cache_aware_token([home, other], lambda w: held[w.address], 1000) is other
    held["home"], home.busy_slots = 900, 64   # batch full: no room
    assert pick_cache_aware_token([home, other], lambda w: held[w.address], 1000) is other
    assert prefill_locally(9800, 10000, 512) and not prefill_locally(9000, 10000, 512)
    assert not prefill_locally(10000, 10000, 0)   # off by default, as the router


def run(pools, routing, n=2000, caching=True):
    trace = load_trace("mooncake-conv").head(n)
    config = SimConfig("llama2-70b", 8, tuple(PoolSpec.parse(role, text) for role, text in pools.items()),
                       routing=routing, prefix_caching=caching)
    return trace, summarize(simulate(config, Profiles(), trace))


def test_cache_aware_routing_reaches_most_of_a_pooled_cache_on_the_conversation_trace():
    trace, aware = run({"mixed": "h100-80gb:8"}, "cacheAware")
    _, least = run({"mixed": "h100-80gb:8"}, "leastLoaded")
    fleet_blocks = aware["pools"]["mixed"]["kv_capacity_tokens"] // 512
    bound = pooled_hit_ratio(zip(trace.blocks, trace.prompt.tolist()), fleet_blocks, 512)
    assert aware["completed"] == least["completed"] == len(trace)
    assert aware["prefix_hit_ratio"] >= 0.8 * bound
    assert aware["prefix_hit_ratio"] > 2 * least["prefix_hit_ratio"] > 0
    assert aware["ttft_s"]["p90"] < least["ttft_s"]["p90"]


def test_split_handoffs_skip_the_blocks_the_token_instance_holds():
    pools = {"prompt": "h100-80gb:4", "token": "h100-80gb:4"}
    _, aware = run(pools, "cacheAware", n=1000)
    _, least = run(pools, "leastLoaded", n=1000)
    _, off = run(pools, "leastLoaded", n=1000, caching=False)
    assert off["prefix_hit_ratio"] == 0 and not off["prefix_caching"]
    assert aware["kv_bytes_moved"] < least["kv_bytes_moved"] < off["kv_bytes_moved"]
    trace = load_trace("mooncake-conv").head(1000)
    handed_off = trace.prompt[trace.output > 1].sum()   # a one-token answer ends on the prompt instance
    assert off["kv_bytes_moved"] == handed_off * 327680


def test_simulate_json_reports_the_cache_and_each_pools_kv_capacity(capsys):
    assert cli(["simulate", "--trace", "mooncake-conv", "--requests", "200", "--prompt", "h100-80gb:2",
                "--token", "a100-80gb:2", "--routing", "cacheAware", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert 0 < s["prefix_hit_ratio"] < 1 and s["kv_bytes_moved"] > 0
    per_machine = Profiles().get("llama2-70b", "h100-80gb", 8).kv_capacity_tokens
    assert s["pools"]["prompt"]["kv_capacity_tokens"] == 2 * per_machine
    assert cli(["simulate", "--trace", "code", "--requests", "10", "--baseline", "h100-80gb:1",
                "--routing", "nearest"]) == 2
    assert "--routing" in capsys.readouterr().err
