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
    costs = [float(line.split()[-7]) for line in rows]
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
