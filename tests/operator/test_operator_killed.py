"""An operator process SIGKILLed in the middle of a reconcile (some children created, others not
yet: the emulator is slow to create) leaves nothing for the next operator process to trip over:
it converges to exactly the desired children, each once and owned by the SplitInference, and
keeps the ones already there."""

import time

from support.examples import load_example
from support.kube_emulator import EmulatorThread
from support.operator_children import KINDS, NS, get_si, live_children, rendered
from support.operator_harness import kube_client, start_operator, stop_operator
from support.polling import wait_for

from phasesplit.operator import builders
from phasesplit.operator.apply import matches

CREATE_DELAY = 0.5


def every_object(kube) -> dict[str, dict]:
    """Every object of the kinds the operator creates in the namespace, whoever made it."""
    return {f"{kind}/{o['metadata']['name']}": o
            for kind, version in KINDS.items() for o in kube.list(version, kind, NS)}


def test_a_new_operator_converges_after_one_killed_mid_reconcile(tmp_path):
    with EmulatorThread() as emulator:
        kube = kube_client(emulator.url)
        kubeconfig = emulator.kubeconfig(tmp_path / "kubeconfig")
        log = tmp_path / "operator.log"
        emulator.emulator.create_delay = CREATE_DELAY
        first = start_operator(kubeconfig, log)
        try:
            doc = load_example("tiny-cpu")
            doc["metadata"]["namespace"] = NS
            kube.create(doc)
            wait_for(lambda: len(live_children(kube, "tiny")) >= 2, timeout=60, what="the first children")
            first.kill()
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        time.sleep(2 * CREATE_DELAY)   # a create the dead operator had sent lands now
        body = get_si(kube, "tiny")
        want = {f"{o['kind']}/{o['metadata']['name']}": o for o in rendered(body)}
        survivors = {k: o["metadata"]["uid"] for k, o in live_children(kube, "tiny").items()}
        assert 0 < len(survivors) < len(want), f"the kill did not land mid-reconcile: {sorted(survivors)}"

        emulator.emulator.create_delay = 0.0
        mark = log.stat().st_size
        second = start_operator(kubeconfig, log)
        try:
            wait_for(lambda: "Handler 'reconcile_fn' succeeded" in log.read_text()[mark:], timeout=60,
                     what="the next operator's reconcile")
            children = every_object(kube)
        finally:
            stop_operator(second)
        assert sorted(children) == sorted(want), "duplicate, stray or missing children"
        owner = builders.Owner("tiny", NS, body["metadata"]["uid"]).reference()
        for key, obj in children.items():
            assert obj["metadata"]["ownerReferences"] == [owner], key
            assert matches(want[key], obj), key
        assert {k: children[k]["metadata"]["uid"] for k in survivors} == survivors, "children were recreated"
        assert (get_si(kube, "tiny").get("status") or {}).get("pools"), "the next operator wrote no status"
        assert emulator.emulator.denied == []
