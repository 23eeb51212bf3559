"""End-to-end fixtures: real worker and router processes on 127.0.0.1, started through local mode."""

from __future__ import annotations

import threading

import pytest
from support.serving import manifest, start_cluster

from phasesplit.local.launcher import LocalCluster


@pytest.fixture(scope="session")
def clusters(tiny_model_dir, tmp_path_factory):
    """(split, mixed): 2 prompt + 2 token workers behind one router; 1 mixed worker behind another."""
    logs = tmp_path_factory.mktemp("serving-logs")
    docs = {"split": manifest("split", {"prompt": 2, "token": 2}), "mixed": manifest("mixed", {"mixed": 1})}
    started: dict[str, LocalCluster] = {}
    errors: list[BaseException] = []

    def start(name):
        try:
            started[name] = start_cluster(docs[name], tiny_model_dir, logs / name)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in docs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        supervisors = [cluster.supervise(0.5) for cluster in started.values()]   # fault tests kill processes
        yield started["split"], started["mixed"]
    finally:
        for stop in supervisors if not errors else []:
            stop.set()
        for cluster in started.values():
            cluster.stop(15)


@pytest.fixture
def split(clusters):
    return clusters[0]


@pytest.fixture
def mixed(clusters):
    return clusters[1]
