"""A tensor-parallel mixed worker (2 gloo ranks) serves what a single-rank one does, and lives and
dies with its ranks."""

import asyncio
import os
import pathlib
import signal
import time

import uuid

import pytest
from support.completions import complete_all, prompts
from support.polling import poll
from support.serving import manifest, start_cluster, start_worker, worker_load
from support.turns import conversation, turn, words

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp2(tiny_model_dir, tmp_path_factory):
    doc = manifest("tp2", {"mixed": 1})
    doc["spec"]["pools"]["mixed"]["tensorParallelSize"] = 2
    cluster = start_cluster(doc, tiny_model_dir, tmp_path_factory.mktemp("tp2-logs"))
    yield cluster
    cluster.stop(15)


def test_greedy_requests_through_two_ranks_match_one_rank(tp2, mixed):
    jobs = prompts(12, seed=3)
    through_tp2 = asyncio.run(complete_all(tp2.base_url, jobs))
    assert through_tp2 == asyncio.run(complete_all(mixed.base_url, jobs))
    assert sum(n for _, n, _ in through_tp2) >= 12 * 4


def _ranks(pid: int) -> list[int]:
    """The rank processes a worker started (spawned interpreters; not multiprocessing's resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    return [p for p in children if b"spawn_main" in pathlib.Path(f"/proc/{p}/cmdline").read_bytes()]


def _running(pid: int) -> bool:
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_a_dead_rank_takes_the_worker_down_with_a_nonzero_exit(tiny_model_dir, tmp_path):
    proc, _ = start_worker(tiny_model_dir, tmp_path, "mixed", "--tensor-parallel", "2")
    try:
        ranks = _ranks(proc.popen.pid)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        assert proc.popen.wait(60) != 0
        time.sleep(0.5)
        assert not any(_running(p) for p in ranks)
    finally:
        proc.stop(5)


@pytest.fixture(scope="module", params=["grpc", "tcp", "nccl"])
def split_tp2(request, tiny_model_dir, tmp_path_factory):
    """Prompt and token pools of 2 gloo ranks each: every rank moves its own KV-head shard. The prompt
    pool's step budget is four blocks, so longer prompts are prefilled, and their KV sent, in chunks."""
    doc = manifest(f"split-tp2-{request.param}", {"prompt": 1, "token": 1})
    doc["spec"]["kvTransfer"]["backend"] = request.param
    for pool in ("prompt", "token"):
        doc["spec"]["pools"][pool]["tensorParallelSize"] = 2
    doc["spec"]["pools"]["prompt"].setdefault("engine", {})["maxNumBatchedTokens"] = 64
    cluster = start_cluster(doc, tiny_model_dir, tmp_path_factory.mktemp(f"split-tp2-{request.param}-logs"))
    yield cluster
    cluster.stop(15)


def test_split_pools_of_two_ranks_each_match_one_mixed_rank_and_leak_nothing(split_tp2, mixed):
    jobs = prompts(12, seed=5)
    through_split = asyncio.run(complete_all(split_tp2.base_url, jobs))
    assert through_split == asyncio.run(complete_all(mixed.base_url, jobs))
    for address in split_tp2.addresses("prompt") + split_tp2.addresses("token"):
        assert worker_load(address).kv_blocks_used == 0


def test_each_rank_sends_only_the_blocks_its_token_rank_lacks(split_tp2):
    """A second turn: every rank's transfer skips the first turn's blocks, which its token rank holds (the
    prompt is prefilled in chunks, the first ones inside those blocks)."""
    salt, history = uuid.uuid4().hex, conversation(4)
    first, _ = turn(split_tp2.base_url, history, salt)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "turn 2: " + words(8, 12)}]
    second, (moved, sent, held) = turn(split_tp2.base_url, history, salt)
    every, (moved_all, sent_all, _) = turn(split_tp2.base_url, history, uuid.uuid4().hex)
    assert second == every
    assert held > 4 and sent + held == sent_all and moved * sent_all == moved_all * sent
    addresses = split_tp2.addresses("prompt") + split_tp2.addresses("token")
    used = poll(lambda: [worker_load(a).kv_blocks_used for a in addresses], lambda u: not any(u), 10, interval=0.2)
    assert not any(used), used
