"""The simulator runs the running system's policies: the same batches as the engine's scheduler,
the same picks as the router, the same scaling policy as the operator and local mode. Each test
fails if either side changes alone."""

import numpy as np
import pytest

import phasesplit.fleet.sim as sim_module
import phasesplit.local.autoscaler as local_autoscaler
import phasesplit.operator.autoscaler as operator_autoscaler
import phasesplit.router.dispatch as dispatch
from phasesplit.engine.kv_cache import BlockManager
from phasesplit.engine.sampler import SamplingParams
from phasesplit.engine.scheduler import Scheduler
from phasesplit.engine.sequence import Sequence
from phasesplit.fleet.instance import Instance
from phasesplit.fleet.perf import Profiles
from phasesplit.fleet.sim import PoolSpec, SimConfig, Simulation
from phasesplit.fleet.trace import Trace
from phasesplit.router import scheduling
from phasesplit.router.workers import WorkerState
from phasesplit.v1 import worker_pb2 as pb

from support.fleet_profiles import CATALOG, toy_rows, write_profile


def engine_batches(prompts, outputs, num_blocks, max_num_seqs, budget):
    """What the engine's scheduler runs, step by step: ("prefill", ids) or ("decode", batch size). The
    simulator does not model chunked prefill: both run without it."""
    sched = Scheduler(BlockManager(num_blocks, 1), max_num_seqs, budget, num_blocks, {0}, chunked_prefill=False)
    for i, (n, out) in enumerate(zip(prompts, outputs)):
        params = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
        sched.add(Sequence(str(i), [7] * n, params))
    log = []
    while sched.has_unfinished():
        seqs, is_prefill = sched.schedule()
        log.append(("prefill", [int(s.request_id) for s in seqs]) if is_prefill else ("decode", len(seqs)))
        sched.postprocess(seqs, [5] * len(seqs))
    assert sched.num_preemptions == 0, "the scenario must not preempt (the simulator does not model it)"
    return log


def simulated_batches(tmp_path, monkeypatch, prompts, outputs, num_blocks, max_num_seqs, budget):
    """The same requests, all at t=0, on one simulated mixed instance with 1-token KV blocks."""
    profile = write_profile(tmp_path / "p.csv", toy_rows(kv_tokens=num_blocks))
    (tmp_path / "c.yaml").write_text(CATALOG)
    log = []
    start_prefill, start_decode = Instance._start_prefill, Instance._start_decode

    def prefill(self, batch, now):
        log.append(("prefill", list(batch)))
        start_prefill(self, batch, now)

    def decode(self, now):
        start_decode(self, now)
        log.extend([("decode", self.num_running)] * self.stretch[2])

    monkeypatch.setattr(Instance, "_start_prefill", prefill)
    monkeypatch.setattr(Instance, "_start_decode", decode)
    config = SimConfig("toy", 1, (PoolSpec("mixed", "toy-gpu", 1),), block_size=1, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget)
    trace = Trace(np.zeros(len(prompts)), np.array(prompts), np.array(outputs))
    Simulation(config, Profiles(profile, tmp_path / "c.yaml"), trace).run()
    return log


@pytest.mark.parametrize("case", [
    # prompts, outputs, KV blocks, max_num_seqs, prefill budget
    ([300, 500, 1500, 100, 2500, 40, 40, 700], [3, 1, 9, 4, 2, 12, 5, 1], 100_000, 3, 2048),
    ([900, 900, 900, 900, 200], [20, 5, 1, 8, 3], 2000, 8, 2048),
    ([10] * 12, list(range(1, 13)), 1000, 4, 25),
])
def test_simulated_instance_batches_exactly_as_the_engine_scheduler(tmp_path, monkeypatch, case):
    prompts, outputs, blocks, seqs, budget = case
    real = engine_batches(prompts, outputs, blocks, seqs, budget)
    simulated = simulated_batches(tmp_path, monkeypatch, prompts, outputs, blocks, seqs, budget)
    assert simulated == real


def test_router_and_simulator_call_the_same_scheduling_functions():
    for name in ("pick_prompt_worker", "pick_token_worker", "pick_mixed_worker"):
        assert getattr(dispatch, name) is getattr(scheduling, name), f"the router no longer uses {name}"
        assert getattr(sim_module, name) is getattr(scheduling, name), f"the simulator no longer uses {name}"


async def test_simulated_instances_read_as_router_worker_states(toy_profiles):
    """For the same loads, the functions pick the same worker from WorkerStates and from instances."""
    rng = np.random.default_rng(5)
    config = SimConfig("toy", 1, (PoolSpec("prompt", "toy-gpu", 4), PoolSpec("token", "toy-gpu", 4)), block_size=16)
    sim = Simulation(config, toy_profiles, Trace(np.zeros(1), np.ones(1, int), np.ones(1, int)))
    for _ in range(20):
        waiting, free = rng.integers(0, 5000, 4), rng.integers(0, 5000, 4)
        states, instances = [], []
        for k, pool in enumerate(("prompt",) * 4):
            w = WorkerState(f"w{k}:1", pool)
            w.info = pb.WorkerInfo(role=pool, layout=pb.KVLayout(block_size=16))
            w.load = pb.WorkerLoad(waiting_tokens=int(waiting[k]), kv_blocks_free=int(free[k]))
            states.append(w)
            inst = sim.pools["prompt"][k]
            inst.queued_prompt_tokens, inst.free_blocks = int(waiting[k]), float(free[k])
            instances.append(inst)
        for pick in (scheduling.pick_prompt_worker, scheduling.pick_token_worker, scheduling.pick_mixed_worker):
            assert states.index(pick(states)) == instances.index(pick(instances))


def test_operator_local_mode_and_simulator_scale_with_one_policy():
    assert sim_module.SplitScaler is local_autoscaler.SplitScaler is operator_autoscaler.SplitScaler


def test_router_and_simulator_lend_the_mixed_pool_with_the_same_functions():
    from phasesplit.router import lending
    for name in ("prompt_candidates", "token_candidates"):
        assert getattr(dispatch, name) is getattr(lending, name), f"the router no longer uses {name}"
        assert getattr(sim_module, name) is getattr(lending, name), f"the simulator no longer uses {name}"


def engine_chunked_steps(prompts, outputs, num_blocks, max_num_seqs, budget):
    """The engine's scheduler with chunked prefill: ("step", decodes, [(id, chunk tokens)]) or ("decode", n)."""
    sched = Scheduler(BlockManager(num_blocks, 1), max_num_seqs, budget, num_blocks, {0}, chunked_prefill=True)
    for i, (n, out) in enumerate(zip(prompts, outputs)):
        sched.add(Sequence(str(i), [7] * n, SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)))
    log = []
    while sched.has_unfinished():
        seqs, _ = sched.schedule()
        chunks = [(int(s.request_id), s.num_scheduled_tokens) for s in seqs if s.num_output_tokens == 0]
        log.append(("step", len(seqs) - len(chunks), chunks) if chunks else ("decode", len(seqs)))
        sched.postprocess(seqs, [5 if s.num_cached_tokens + s.num_scheduled_tokens >= s.num_prompt_tokens
                                 or s.num_output_tokens else None for s in seqs])
    assert sched.num_preemptions == 0
    return log


def simulated_chunked_steps(tmp_path, monkeypatch, prompts, outputs, num_blocks, max_num_seqs, budget):
    profile = write_profile(tmp_path / "p.csv", toy_rows(kv_tokens=num_blocks))
    (tmp_path / "c.yaml").write_text(CATALOG)
    log = []
    start_mixed, start_decode = Instance._start_mixed, Instance._start_decode

    def mixed(self, chunks, now):
        log.append(("step", self.num_running, list(chunks)))
        start_mixed(self, chunks, now)

    def decode(self, now):
        start_decode(self, now)
        log.extend([("decode", self.num_running)] * self.stretch[2])

    monkeypatch.setattr(Instance, "_start_mixed", mixed)
    monkeypatch.setattr(Instance, "_start_decode", decode)
    config = SimConfig("toy", 1, (PoolSpec("mixed", "toy-gpu", 1),), block_size=1, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, chunked_prefill=budget)
    trace = Trace(np.zeros(len(prompts)), np.array(prompts), np.array(outputs))
    Simulation(config, Profiles(profile, tmp_path / "c.yaml"), trace).run()
    return log


@pytest.mark.parametrize("case", [
    ([300, 500, 1500, 100, 2500, 40, 40, 700], [3, 1, 9, 4, 2, 12, 5, 1], 100_000, 3, 512),
    ([900, 900, 900, 900, 200], [20, 5, 1, 8, 3], 3000, 8, 256),
    ([10] * 12, list(range(1, 13)), 1000, 4, 25),
])
def test_simulated_instance_runs_chunked_prefill_steps_as_the_engine_scheduler(tmp_path, monkeypatch, case):
    prompts, outputs, blocks, seqs, budget = case
    real = engine_chunked_steps(prompts, outputs, blocks, seqs, budget)
    assert any(kind == "step" and decodes for kind, decodes, *_ in real)   # chunks rode beside decodes
    assert simulated_chunked_steps(tmp_path, monkeypatch, prompts, outputs, blocks, seqs, budget) == real


def test_the_simulator_routes_cache_aware_with_the_routers_functions():
    from phasesplit.router import cache_routing
    for name in ("pick_cache_aware", "pick_cache_aware_token", "prefill_locally"):
        assert getattr(sim_module, name) is getattr(cache_routing, name)
    assert cache_routing.POLICIES == ("cacheAware", "leastLoaded")
