"""`phasesplit plan`: the cheapest design that meets the SLOs, budgets, and an emitted SplitInference."""

import yaml

from phasesplit.cli import main as cli
from phasesplit.fleet.report import Slo
from phasesplit.fleet.search import Design, Planner, designs
from phasesplit.fleet.sim import PoolSpec, SimConfig
from phasesplit.fleet.trace import Trace
from phasesplit.control.spec import SplitInference

import numpy as np

SLOS = (Slo.parse("ttft.p90=2s"), Slo.parse("tbt.p90=0.05s"))


def planner(profiles, n=300):
    rng = np.random.default_rng(2)
    trace = Trace(np.zeros(n), rng.integers(200, 800, n), rng.integers(5, 40, n))
    base = SimConfig("toy", 1, (PoolSpec("mixed", "toy-gpu", 1),))
    return Planner(profiles, base, trace, SLOS, "toy-gpu", num_requests=n)


def test_smallest_split_design_meets_the_slos_and_one_machine_less_does_not(toy_profiles):
    p = planner(toy_profiles)
    c = p.smallest(Design("split", "toy-gpu", "toy-gpu"), rate=4.0)
    assert c.met and c.prompt >= 2
    assert not p.evaluate(c.design, c.prompt - 1, c.token, 4.0).met
    assert c.token == 1 or not p.evaluate(c.design, c.prompt, c.token - 1, 4.0).met


def test_a_bigger_budget_buys_a_higher_rate(toy_profiles):
    p = planner(toy_profiles)
    design = Design("split", "toy-big", "toy-gpu")
    small = p.best_rate(design, "cost_per_hour", 20.0, 2.0)
    large = p.best_rate(design, "cost_per_hour", 60.0, 2.0)
    assert small.met and large.met and small.cost <= 20.0 and large.cost <= 60.0
    assert large.rate > 2 * small.rate


def test_designs_cover_baselines_and_every_pairing():
    names = [str(d) for d in designs(["a", "b"])]
    assert names == ["baseline a", "chunked a", "baseline b", "chunked b", "split a -> a", "split a -> b",
                     "split b -> a", "split b -> b"]


def test_plan_command_ranks_by_cost_and_emits_a_valid_splitinference(tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    assert cli(["plan", "--trace", "conv", "--rate", "4", "--sample", "300", "--hardware", "a100-80gb,h100-80gb",
                "--emit", str(out), "--name", "conv-plan"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines()[1:] if line[:2].strip().isdigit()]
    costs = [float(line.split()[-9]) for line in rows]
    assert len(rows) == 8 and costs == sorted(costs) and "met" in rows[0]
    doc = yaml.safe_load(out.read_text())
    spec = SplitInference.model_validate(doc).spec
    assert doc["metadata"]["name"] == "conv-plan"
    best = rows[0].split()
    pools = dict(spec.pools.items())
    if best[1] == "split":
        prompt, token = (int(n) for n in best[5].split("+"))
        assert (pools["prompt"].replicas, pools["token"].replicas) == (prompt, token)
        assert pools["prompt"].node_selector and pools["prompt"].resources.requests["nvidia.com/gpu"] == 8
        assert pools["prompt"].autoscaling.min_replicas <= prompt <= pools["prompt"].autoscaling.max_replicas


def test_plan_names_the_bad_option(capsys):
    assert cli(["plan", "--trace", "code", "--objective", "throughput"]) == 2
    assert "needs exactly one of --max-cost and --max-power" in capsys.readouterr().err
    assert cli(["plan", "--trace", "code", "--rate", "1", "--hardware", "tpu"]) == 2
    assert "--hardware: 'tpu' has no profile" in capsys.readouterr().err


def test_the_search_tries_each_mixed_pool_size_and_a_mixed_pool_never_needs_more_own_machines(toy_profiles):
    sized = designs(["a"], baseline=False, mixed="b", mixed_sizes=(0, 1, 2))
    assert [str(d) for d in sized] == ["split a -> a", "split a -> a + mixed b", "split a -> a + mixed b"]
    assert [d.mixed_machines for d in sized] == [0, 1, 2]
    p = planner(toy_profiles)
    alone = p.smallest(Design("split", "toy-gpu", "toy-gpu"), rate=4.0)
    lent = p.smallest(Design("split", "toy-gpu", "toy-gpu", "toy-gpu", 2), rate=4.0)
    assert lent.met and lent.design.mixed_machines == 2
    assert lent.prompt <= alone.prompt and lent.token <= alone.token
    assert lent.prompt == 1 or not p.evaluate(lent.design, lent.prompt - 1, lent.token, 4.0).met


def test_plan_command_reads_a_mixed_size_range_and_refuses_a_bad_one(capsys):
    from phasesplit.fleet.plan import mixed_pool
    assert mixed_pool("h100-80gb:0-2", ["h100-80gb"]) == ("h100-80gb", (0, 1, 2))
    assert mixed_pool("h100-80gb:3", ["h100-80gb"]) == ("h100-80gb", (3,))
    for bad in ("h100-80gb:2-1", "h100-80gb:0", "x:1", "h100-80gb:a"):
        try:
            mixed_pool(bad, ["h100-80gb"])
        except ValueError as e:
            assert "--mixed" in str(e)
        else:
            raise AssertionError(bad)


def test_plan_json_is_one_document_with_every_candidate_and_the_best_marked(tmp_path, capsys):
    import json
    out = tmp_path / "best.yaml"
    assert cli(["plan", "--trace", "code", "--rate", "3", "--sample", "200", "--hardware", "h100-80gb",
                "--json", "--emit", str(out), "--source", "pvc:llama/70b"]) == 0
    doc = json.loads(capsys.readouterr().out)
    candidates = doc["candidates"]
    assert [c["design"] for c in candidates if c["best"]] == [candidates[0]["design"]] and candidates[0]["rank"] == 1
    assert {c["kind"] for c in candidates} == {"baseline", "chunked", "split"}
    for c in candidates:
        assert c["cost_per_hour"] == sum(c["machines"].values()) * 38.0 and c["power_w"] > 0
        assert set(c["slos"]) == {str(s) for s in __import__("phasesplit.fleet.report").fleet.report.PAPER_SLOS}
        assert c["met"] == all(v["met"] for v in c["slos"].values()) and c["sized_at_rps"] == 3.0
    assert doc["emitted"].startswith(f"wrote {out}: SplitInference planned") and "NOTE" not in doc["emitted"]
    assert cli(["plan", "--trace", "code", "--rate", "3", "--json", "--emit", "-"]) == 2
    assert "--json and --emit -" in capsys.readouterr().err


def test_emit_says_what_it_wrote_marks_a_placeholder_source_and_requests_cpu_and_memory(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli(["plan", "--trace", "code", "--rate", "3", "--sample", "200", "--hardware", "h100-80gb",
                "--no-split", "--emit", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: SplitInference planned" in said and "placeholder" in said and "--source" in said
    doc = yaml.safe_load(out.read_text())
    assert "phasesplit.io/placeholder-source" in doc["metadata"]["annotations"]
    requests = doc["spec"]["pools"]["mixed"]["resources"]["requests"]
    assert requests["cpu"] == "16" and requests["memory"] == "256Gi" and requests["nvidia.com/gpu"] == 8


def test_max_machines_caps_every_candidate(capsys):
    import json
    assert cli(["plan", "--trace", "code", "--rate", "3", "--sample", "200", "--hardware", "h100-80gb,a100-80gb",
                "--max-machines", "3", "--json"]) == 0
    candidates = json.loads(capsys.readouterr().out)["candidates"]
    assert candidates and all(c["total_machines"] <= 3 for c in candidates)
    assert cli(["plan", "--trace", "code", "--rate", "3", "--max-machines", "0"]) == 2
    assert "--max-machines: must be >= 1" in capsys.readouterr().err


def test_under_a_budget_the_answer_does_not_depend_on_the_starting_rate(toy_profiles):
    p = planner(toy_profiles)
    design = Design("split", "toy-big", "toy-gpu")
    slow, fast = p.best_rate(design, "cost_per_hour", 60.0, 0.5), p.best_rate(design, "cost_per_hour", 60.0, 20.0)
    assert slow.met and fast.met
    assert abs(slow.rate - fast.rate) <= 0.15 * max(slow.rate, fast.rate)
    assert abs(slow.sized_at - fast.sized_at) <= 0.25 * max(slow.sized_at, fast.sized_at)
    assert p.price(design, slow.prompt, slow.token, "cost_per_hour") > 0.8 * 60


def test_plan_ranks_the_same_with_or_without_a_rate_under_a_budget(capsys):
    import json
    base = ["plan", "--trace", "conv", "--objective", "throughput", "--max-cost", "760", "--sample", "300",
            "--hardware", "h100-80gb", "--json"]
    assert cli(base) == 0
    without = json.loads(capsys.readouterr().out)["candidates"]
    assert cli(base + ["--rate", "30"]) == 0
    with_rate = json.loads(capsys.readouterr().out)["candidates"]
    assert [c["design"] for c in without][:2] == [c["design"] for c in with_rate][:2]
    assert all(c["total_machines"] <= 20 for c in without + with_rate)
