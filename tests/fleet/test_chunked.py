"""The colocated design with chunked prefill: its steps' prices, its effect, and its place in `plan`."""

import csv

import numpy as np
import pytest
import yaml

from phasesplit.cli import main as cli
from phasesplit.fleet.perf import MIXED_COLUMNS, Profiles
from phasesplit.fleet.report import summarize
from phasesplit.fleet.search import Design, designs
from phasesplit.fleet.sim import PoolSpec, SimConfig, simulate
from phasesplit.fleet.trace import Trace, load_trace, redraw

from support.fleet_profiles import CATALOG, toy_rows, write_profile


def colocated(budget, **settings):
    return SimConfig("toy", 1, (PoolSpec("mixed", "toy-gpu", 1),), max_num_seqs=8, chunked_prefill=budget, **settings)


def lone(profiles, budget):
    return summarize(simulate(colocated(budget), profiles, Trace(np.array([0.0]), np.array([100]), np.array([10]))))


def test_a_lone_prompt_in_chunks_costs_what_the_whole_prefill_does_when_prefill_is_linear(toy_profiles):
    # 100 tokens at 1 ms/token in chunks of 40, 40, 20; then 9 decodes of 10 ms.
    s = lone(toy_profiles, 40)
    assert s["ttft_s"]["p50"] == pytest.approx(0.1) and s["e2e_s"]["p50"] == pytest.approx(0.19)


def test_a_measured_mixed_profile_prices_the_steps(tmp_path):
    mixed = tmp_path / "mixed.csv"
    with mixed.open("w", newline="") as f:
        w = csv.DictWriter(f, MIXED_COLUMNS)
        w.writeheader()
        for chunk in (10, 1000):
            for decodes in (0, 8):
                w.writerow({"model": "toy", "hardware": "toy-gpu", "tensor_parallel": 1, "chunk_tokens": chunk,
                            "num_decodes": decodes, "step_time": 5.0})
    (tmp_path / "c.yaml").write_text(CATALOG)
    profiles = Profiles(write_profile(tmp_path / "p.csv", toy_rows()), tmp_path / "c.yaml", mixed=mixed)
    assert lone(profiles, 40)["ttft_s"]["p50"] == pytest.approx(0.015)   # three steps of 5 ms
    (tmp_path / "bad.csv").write_text("model,hardware\n")
    with pytest.raises(ValueError, match="missing column"):
        Profiles(tmp_path / "p.csv", tmp_path / "c.yaml", mixed=tmp_path / "bad.csv")


def test_a_chunk_after_a_long_prefix_pays_for_attending_to_it():
    perf = Profiles().get("llama2-70b", "h100-80gb", 8)
    first, late = perf.mixed_time([(0, 2048)], 0), perf.mixed_time([(16384, 2048)], 0)
    assert late > first and first == pytest.approx(perf.prompt_time(2048))
    assert perf.mixed_time([(0, 2000)], 48) >= perf.token_time(48)


def test_chunked_prefill_keeps_decodes_going_where_whole_prefills_pause_them():
    trace = redraw(load_trace("code"), 30.0, 1500, seed=2)
    pools = (PoolSpec("mixed", "h100-80gb", 16),)
    whole = summarize(simulate(SimConfig("llama2-70b", 8, pools), Profiles(), trace))
    chunked = summarize(simulate(SimConfig("llama2-70b", 8, pools, chunked_prefill=512), Profiles(), trace))
    assert chunked["completed"] == whole["completed"] == len(trace)
    assert chunked["tbt_s"]["p99"] < 0.6 * whole["tbt_s"]["p99"]
    assert chunked["tbt_s"]["p90"] < whole["tbt_s"]["p90"]


def test_simulate_takes_a_chunk_budget_and_refuses_one_too_small(capsys):
    base = ["simulate", "--trace", "code", "--requests", "50", "--baseline", "h100-80gb:2"]
    assert cli(base + ["--chunked-prefill"]) == 0
    assert cli(base + ["--chunked-prefill", "32"]) == 2
    assert "--chunked-prefill: the step budget must exceed --max-num-seqs (64)" in capsys.readouterr().err


def test_plan_searches_chunked_colocated_designs_and_emits_them_chunked(tmp_path, capsys, toy_profiles):
    assert [str(d) for d in designs(["a"])] == ["baseline a", "chunked a", "split a -> a"]
    assert [str(d) for d in designs(["a"], chunked=False)] == ["baseline a", "split a -> a"]
    assert Design("chunked", "a").pools(3) == (PoolSpec("mixed", "a", 3),)
    out = tmp_path / "chunked.yaml"
    assert cli(["plan", "--trace", "code", "--rate", "4", "--sample", "200", "--hardware", "h100-80gb",
                "--no-split", "--chunked-prefill", "1024", "--emit", str(out)]) == 0
    table = capsys.readouterr().out
    assert "chunked h100-80gb" in table and "baseline h100-80gb" in table
    doc = yaml.safe_load(out.read_text())
    engine = doc["spec"]["pools"]["mixed"]["engine"]
    chunked_first = table.splitlines()[1].split()[1] == "chunked"
    assert engine["chunkedPrefill"] is chunked_first
    assert engine["maxNumBatchedTokens"] == (1024 if chunked_first else 2048)
