"""The cluster simulator: conservation, determinism, and the effects a user would expect."""

import numpy as np
import pytest

from phasesplit.fleet.report import summarize
from phasesplit.fleet.sim import PoolSpec, SimConfig, simulate
from phasesplit.fleet.trace import Trace, load_trace, redraw


def cluster(**pools):
    specs = tuple(PoolSpec.parse(role, text) for role, text in pools.items())
    return SimConfig(model="toy", tp=1, pools=specs)


def poisson(rate, n, prompt=(50, 400), output=(2, 40), seed=1):
    rng = np.random.default_rng(seed)
    base = Trace(np.zeros(n), rng.integers(*prompt, n), rng.integers(*output, n))
    return redraw(base, rate, n, seed)


def test_every_request_finishes_once_after_its_first_token(toy_profiles):
    trace = poisson(rate=20, n=400)
    for config in (cluster(prompt="toy-gpu:2", token="toy-gpu:2"), cluster(mixed="toy-gpu:3"),
                   cluster(prompt="toy-gpu:1", token="toy-gpu:1", mixed="toy-gpu:2")):
        out = simulate(config, toy_profiles, trace)
        first, finish, arrival = map(np.asarray, (out.first, out.finish, out.arrival))
        assert not np.isnan(finish).any(), config
        assert (arrival <= first).all() and (first <= finish).all()
        one = np.asarray(out.output_tokens) == 1
        assert (first[one] == finish[one]).all()


def test_same_seed_same_figures_other_seed_other_arrivals(toy_profiles):
    config = cluster(prompt="toy-gpu:2", token="toy-gpu:1")
    a = summarize(simulate(config, toy_profiles, poisson(20, 300, seed=3)))
    b = summarize(simulate(config, toy_profiles, poisson(20, 300, seed=3)))
    c = summarize(simulate(config, toy_profiles, poisson(20, 300, seed=4)))
    assert a == b and a["e2e_s"] != c["e2e_s"]


def test_a_lone_request_takes_the_modelled_times(toy_profiles):
    # 100 prompt tokens at 1 ms/token; 9 tokens after the first at 10 ms (batch of 1); 0.1 MB of KV over 10 MB/s.
    trace = Trace(np.array([0.0]), np.array([100]), np.array([10]))
    s = summarize(simulate(cluster(prompt="toy-gpu:1", token="toy-gpu:1"), toy_profiles, trace))
    handoff = 100 * 1000 / 1e7 / 4   # the last of 4 layers is not hidden
    assert s["ttft_s"]["p50"] == pytest.approx(0.1)
    assert s["e2e_s"]["p50"] == pytest.approx(0.1 + handoff + 9 * 0.010)
    assert s["cost_per_hour"] == 4.0 and s["power_w"] == 600


def test_overload_shows_as_queueing_and_more_machines_remove_it(toy_profiles):
    trace = poisson(rate=3, n=600, prompt=(500, 1500))
    small = summarize(simulate(cluster(prompt="toy-gpu:1", token="toy-gpu:1"), toy_profiles, trace))
    large = summarize(simulate(cluster(prompt="toy-gpu:4", token="toy-gpu:1"), toy_profiles, trace))
    assert small["ttft_s"]["p90"] > 5 * large["ttft_s"]["p90"]
    assert small["pools"]["prompt"]["utilization"] > 0.95 > large["pools"]["prompt"]["utilization"]


def test_the_mixed_pool_takes_prompts_when_the_prompt_pool_is_overloaded(toy_profiles):
    trace = poisson(rate=3, n=600, prompt=(500, 1500))
    without = summarize(simulate(cluster(prompt="toy-gpu:1", token="toy-gpu:1"), toy_profiles, trace))
    lent = summarize(simulate(cluster(prompt="toy-gpu:1", token="toy-gpu:1", mixed="toy-gpu:2"), toy_profiles, trace))
    assert lent["pools"]["mixed"]["utilization"] > 0.2
    assert lent["ttft_s"]["p90"] < without["ttft_s"]["p90"] / 3


def test_an_elastic_pool_grows_under_load_through_the_autoscaling_policy(toy_profiles):
    trace = poisson(rate=3, n=1000, prompt=(500, 1500))
    config = SimConfig(model="toy", tp=1, startup_seconds=5.0, autoscale_interval=5.0,
                       pools=(PoolSpec.parse("prompt", "toy-gpu:1:1-6"), PoolSpec.parse("token", "toy-gpu:1")))
    s = summarize(simulate(config, toy_profiles, trace))
    ups = [e for e in s["scaling"] if e["pool"] == "prompt" and e["to"] > e["from"]]
    assert ups and "queueTokens" in ups[0]["reason"]
    assert 1 < s["pools"]["prompt"]["machines"] <= 6


def test_bundled_trace_on_the_papers_coding_cluster_keeps_up(tmp_path):
    from phasesplit.fleet.perf import Profiles
    trace = load_trace("code")
    assert len(trace) == 8819
    s = summarize(simulate(SimConfig("llama2-70b", 8, (PoolSpec.parse("prompt", "h100-80gb:35"),
                                                        PoolSpec.parse("token", "a100-80gb:5"))),
                           Profiles(), Trace(trace.arrival[:2000], trace.prompt[:2000], trace.output[:2000])))
    assert s["unfinished"] == 0 and s["cost_per_hour"] == pytest.approx(35 * 38.0 + 5 * 17.6)


def test_simulate_command_prints_the_documented_json_keys(capsys):
    from phasesplit.cli import main as cli
    assert cli(["simulate", "--trace", "code", "--requests", "300", "--model", "llama2-70b", "--tp", "8",
                "--prompt", "h100-80gb:3", "--token", "a100-80gb:1", "--json"]) == 0
    import json
    s = json.loads(capsys.readouterr().out)
    for key in ("ttft_s", "tbt_s", "e2e_s"):
        assert set(s[key]) == {"p50", "p90", "p99"} and s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
    assert s["throughput_rps"] > 0 and s["cost_per_hour"] == 3 * 38.0 + 17.6 and s["power_w"] == 3 * 10200 + 6500
    assert set(s["pools"]) == {"prompt", "token"} and 0 < s["pools"]["token"]["utilization"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--prompt", "h100-80gb:x", "--token", "a100-80gb:1"], "--prompt: 'h100-80gb:x' is not HW:N"),
    (["--prompt", "h100-80gb:1"], "a split cluster needs both --prompt and --token"),
    (["--baseline", "h100-80gb:1", "--token", "a100-80gb:1"], "--baseline is the non-split design"),
    (["--baseline", "tpu:1"], "no profile rows for model=llama2-70b hardware=tpu"),
    (["--baseline", "h100-80gb:1", "--slo", "ttft.p95=2x"], "--slo: 'ttft.p95=2x' is not METRIC.QUANTILE=LIMIT"),
])
def test_simulate_command_names_the_bad_field(capsys, args, message):
    from phasesplit.cli import main as cli
    assert cli(["simulate", "--trace", "code", "--requests", "10", *args]) == 2
    assert message in capsys.readouterr().err


def test_simulate_shows_the_offered_rate_beside_the_completed_one(capsys):
    from phasesplit.cli import main as cli
    assert cli(["simulate", "--trace", "code", "--rate", "30", "--requests", "300", "--baseline", "h100-80gb:1"]) == 0
    text = capsys.readouterr().out
    assert "offered 2" in text and "drained after the last arrival" in text
    assert cli(["simulate", "--trace", "code", "--rate", "30", "--requests", "300", "--baseline", "h100-80gb:1",
                "--json"]) == 0
    import json
    s = json.loads(capsys.readouterr().out)
    assert 25 < s["offered_rps"] < 35 and s["throughput_rps"] < s["offered_rps"] / 2 and s["drain_s"] > 10


def test_decode_batches_beyond_the_measured_ones_are_flagged(toy_profiles):
    trace = poisson(rate=50, n=300, output=(50, 100))
    wide = SimConfig("toy", 1, (PoolSpec("mixed", "toy-gpu", 1),), max_num_seqs=16)
    s = summarize(simulate(wide, toy_profiles, trace))
    assert s["extrapolated"]["decode_batch"]["largest_measured"] == 8
    assert 8 < s["extrapolated"]["decode_batch"]["largest_run"] <= 16
    assert any("decode batches of up to" in w and "extrapolated" in w for w in s["warnings"])
    narrow = summarize(simulate(cluster(mixed="toy-gpu:1"), toy_profiles, poisson(rate=1, n=20, prompt=(50, 60))))
    assert narrow["warnings"] == [] and narrow["extrapolated"] == {}


def test_the_timeline_samples_each_pools_load_for_the_plots(toy_profiles):
    from dataclasses import replace
    config = replace(cluster(prompt="toy-gpu:1", token="toy-gpu:1"), timeline_interval=0.5)
    out = simulate(config, toy_profiles, poisson(rate=3, n=400, prompt=(300, 900)))
    s = summarize(out)
    for role in ("prompt", "token"):
        line = out.timeline[role]
        assert line["time"] == sorted(line["time"]) and line["time"][-1] >= out.duration - 0.5
        assert np.mean(line["utilization"]) == pytest.approx(s["pools"][role]["utilization"], abs=0.05)
    assert max(out.timeline["prompt"]["queue"]) > 0
