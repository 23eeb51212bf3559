"""A tensor-parallel token worker's KV, rank by rank: rank 0's inbox reserves, frees and claims for its
follower's shard inbox too (rank 0's commands run on the follower in order, here in-process), so a
follower never writes a block rank 0 freed and never holds a request rank 0 let go."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from phasesplit.engine.engine import EngineConfig, LLMEngine
from phasesplit.control.worker_config import WorkerConfig
from phasesplit.roles.core import WorkerCore
from phasesplit.roles.kv_inbox import KVInbox
from phasesplit.roles.shard_receive import ShardInbox
from phasesplit.transport.base import TransferAborted
from phasesplit.v1 import worker_pb2 as pb

LEASE = 0.4


class InProcessRanks:
    """Two ranks' message channel: rank 0's broadcast hands each message to the follower at once."""

    def __init__(self):
        self.size, self.rank = 2, 0
        self.on_message = None  # the follower's
        self.votes: list[int] = []

    def broadcast(self, item):
        self.on_message(item)
        return item

    def min_over_ranks(self, value: int) -> int:  # the follower voted first (inside broadcast)
        votes, self.votes = self.votes, []
        return min(value, *votes)


class FollowerRanks:
    size, rank = 2, 1

    def __init__(self, leader: InProcessRanks):
        self.leader = leader

    def min_over_ranks(self, value: int) -> int:
        self.leader.votes.append(value)
        return value


@pytest.fixture
def ranks(tiny_model_dir):
    config = EngineConfig(str(tiny_model_dir), num_kv_blocks=64, max_model_len=256)
    leader, follower = LLMEngine(config), LLMEngine(config)
    tp = InProcessRanks()
    follower.tp = FollowerRanks(tp)
    leader.tp = tp
    shard_inbox = ShardInbox(follower, timeout=5.0, lease=LEASE)
    tp.on_message = shard_inbox.on_message
    core = WorkerCore(leader, WorkerConfig(role="token", model=str(tiny_model_dir), served_model_name="tiny"))
    core.loop.start()
    inbox = KVInbox(core, transfer_timeout=5.0, lease=LEASE, reap_interval=0.05).start()
    yield inbox, shard_inbox
    inbox.stop()
    core.loop.stop()


def header(engine, request_id: str, num_tokens: int = 40) -> pb.KVHeader:
    return pb.KVHeader(request_id=request_id, layout=engine.layout.to_proto(),
                       prompt_token_ids=list(range(1, num_tokens + 1)), first_token=5)


def write_all(dest, engine) -> None:
    k, _ = engine.kv_layer(0)
    one_block = memoryview(bytes(k[0].numel() * k.element_size()))
    for layer in range(engine.layout.num_layers):
        for kind in (0, 1):
            for i in range(len(dest.block_ids)):
                dest.write(layer, kind, i, 1, one_block)


def test_the_follower_writes_into_the_blocks_rank_0_reserved_and_stops_when_rank_0_frees_them(ranks):
    inbox, shards = ranks
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        arriving = pool.submit(shards.begin, header(shards.engine, "r1"))  # first: it waits for rank 0's blocks
        time.sleep(0.1)
        mine = inbox.begin(header(inbox.engine, "r1"))
        shard = arriving.result(5)
    assert shard.block_ids == mine.block_ids
    write_all(shard, shards.engine)
    assert inbox.abort("r1")
    with pytest.raises(TransferAborted):
        shard.write(0, 0, 0, 1, memoryview(bytes(1)))
    assert shards.pending() == 0 and inbox.engine.num_used_blocks == 0
    started = time.monotonic()
    with pytest.raises(TransferAborted, match="refused or freed by rank 0"):
        shards.begin(header(shards.engine, "r1"))  # a shard still on its way: refused at once
    assert time.monotonic() - started < 1.0


def test_kv_that_no_generate_claims_is_forgotten_on_every_rank_when_the_lease_ends(ranks):
    inbox, shards = ranks
    mine = inbox.begin(header(inbox.engine, "r2"))
    shard = shards.begin(header(shards.engine, "r2"))
    write_all(shard, shards.engine)
    shard.commit()
    mine.commit()
    deadline = time.monotonic() + 5
    while inbox.engine.num_used_blocks and time.monotonic() < deadline:
        time.sleep(0.02)
    assert inbox.engine.num_used_blocks == 0 and shards.pending() == 0


def test_generate_claims_only_kv_whose_every_shard_arrived(ranks):
    inbox, shards = ranks
    for rid, complete in (("whole", True), ("partial", False)):
        inbox.begin(header(inbox.engine, rid)).commit()
        shard = shards.begin(header(shards.engine, rid))
        if complete:
            write_all(shard, shards.engine)
            shard.commit()
        assert inbox.claim_shards(rid) is complete
        with pytest.raises(TransferAborted):  # claimed: no rank takes writes for it any more
            shard.write(0, 0, 0, 1, memoryview(bytes(1)))
    assert shards.pending() == 0


def test_a_refused_transfer_refuses_the_followers_shard_at_once(ranks):
    inbox, shards = ranks
    inbox.core.drain()
    with pytest.raises(Exception, match="draining"):
        inbox.begin(header(inbox.engine, "r3"))
    with pytest.raises(TransferAborted):
        shards.begin(header(shards.engine, "r3"))
