"""The token worker's KV inbox over a real engine: aborts free KV in every state, KV arriving for an
aborted request is refused, and the lease and the transfer timeout free what nobody claims."""

from __future__ import annotations

import time

import pytest
from support.polling import wait_for

from phasesplit.engine.engine import EngineConfig, LLMEngine
from phasesplit.control.worker_config import WorkerConfig
from phasesplit.roles.core import WorkerCore
from phasesplit.roles.kv_inbox import FAILED, READY, KVInbox
from phasesplit.roles.tombstones import Tombstones
from phasesplit.transport.base import TransferAborted
from phasesplit.v1 import worker_pb2 as pb

LEASE = 0.4
TRANSFER_TIMEOUT = 0.3


@pytest.fixture
def inbox(tiny_model_dir):
    engine = LLMEngine(EngineConfig(str(tiny_model_dir), num_kv_blocks=64, max_model_len=256))
    core = WorkerCore(engine, WorkerConfig(role="token", model=str(tiny_model_dir), served_model_name="tiny"))
    core.loop.start()
    box = KVInbox(core, transfer_timeout=TRANSFER_TIMEOUT, lease=LEASE, reap_interval=0.05).start()
    yield box
    box.stop()
    core.loop.stop()


def header(inbox: KVInbox, request_id: str, num_tokens: int = 40) -> pb.KVHeader:
    return pb.KVHeader(request_id=request_id, layout=inbox.engine.layout.to_proto(),
                       prompt_token_ids=list(range(1, num_tokens + 1)), first_token=5)


def used_blocks(inbox: KVInbox) -> int:
    return inbox.core.loop.run(lambda: inbox.engine.num_used_blocks)


def write_all(dest, inbox: KVInbox) -> None:
    layout = inbox.engine.layout
    k, _ = inbox.engine.kv_layer(0)
    one_block = bytes(k[0].numel() * k.element_size())
    for layer in range(layout.num_layers):
        for kind in (0, 1):
            for i in range(len(dest.block_ids)):
                dest.write(layer, kind, i, 1, memoryview(one_block))


def test_kv_arriving_after_the_abort_of_its_request_is_refused_and_holds_nothing(inbox):
    assert not inbox.abort("late-1")  # the abort overtakes the KV: nothing here yet
    with pytest.raises(TransferAborted, match="late-1 was aborted"):
        inbox.begin(header(inbox, "late-1"))
    assert used_blocks(inbox) == 0 and inbox.pending() == 0
    assert inbox.wait("late-1", timeout=5) is None  # a Generate for it does not wait out its timeout
    inbox.begin(header(inbox, "other")).abort()  # other requests are not affected


def test_an_abort_frees_kv_that_is_arriving_and_kv_that_arrived(inbox):
    arriving = inbox.begin(header(inbox, "arriving"))
    arrived = inbox.begin(header(inbox, "arrived"))
    write_all(arrived, inbox)
    arrived.commit()
    assert used_blocks(inbox) == 2 * 3 and inbox.pending() == 2
    assert inbox.abort("arriving") and inbox.abort("arrived")
    assert used_blocks(inbox) == 0 and inbox.pending() == 0
    with pytest.raises(TransferAborted):
        arriving.write(0, 0, 0, 1, memoryview(b""))  # the transfer learns at its next chunk
    with pytest.raises(TransferAborted):
        arriving.commit()


def test_tombstones_last_the_lease_then_the_id_may_be_used_again(inbox):
    inbox.abort("again")
    with pytest.raises(TransferAborted):
        inbox.begin(header(inbox, "again"))
    time.sleep(LEASE + 0.05)
    dest = inbox.begin(header(inbox, "again"))
    assert used_blocks(inbox) == 3
    dest.abort()


@pytest.mark.parametrize("state", ["reserved, never committed", "committed, never claimed"])
def test_the_lease_or_the_transfer_timeout_frees_unclaimed_kv(inbox, state):
    dest = inbox.begin(header(inbox, "unclaimed"))
    limit = TRANSFER_TIMEOUT
    if state.startswith("committed"):
        write_all(dest, inbox)
        dest.commit()
        assert dest.state == READY
        limit = LEASE
    start = time.monotonic()
    wait_for(lambda: used_blocks(inbox) == 0, timeout=limit + 2, interval=0.01, what="the blocks to be freed")
    took = time.monotonic() - start
    assert limit - 0.05 <= took <= limit + 0.5, took
    assert dest.state == FAILED and inbox.pending() == 0
    assert inbox.core.loop.stats.used_blocks == 0  # what Worker.Load reports


def test_tombstones_are_bounded_in_number_and_in_time():
    now = [0.0]
    stones = Tombstones(ttl=10, max_size=3, clock=lambda: now[0])
    for rid in "abcd":
        stones.add(rid)
    assert "a" not in stones and all(r in stones for r in "bcd") and len(stones) == 3
    now[0] = 10.0
    assert len(stones) == 0
    with pytest.raises(ValueError, match="ttl"):
        Tombstones(ttl=0)
