"""What a worker tells the router about its prefix cache: deltas of the blocks stored and evicted since
the router's last poll, the whole set when the router is of another epoch or behind the event log."""

from phasesplit.engine.block_manager import BlockManager
from phasesplit.engine.cache_events import CacheEvents
from phasesplit.engine.engine import SamplingParams
from phasesplit.engine.sequence import Sequence
from phasesplit.prefix_hash import block_hashes


def held_after(summaries, view=None) -> set[int]:
    """A router's set after applying `summaries` in order, as CacheView does."""
    view = set() if view is None else view
    for summary in summaries:
        if summary.full:
            view = set(summary.stored)
        else:
            view |= set(summary.stored)
            view -= set(summary.removed)
    return view


def test_a_new_router_gets_the_whole_set_then_deltas():
    events = CacheEvents()
    for h in (1, 2, 3):
        events.stored(h)
    first = events.since("", 0)
    assert first.full and set(first.stored) == {1, 2, 3} and first.sequence == 3
    events.removed(2)
    events.stored(4)
    delta = events.since(first.epoch, first.sequence)
    assert not delta.full and delta.stored == [4] and delta.removed == [2] and delta.sequence == 5
    assert events.since(first.epoch, delta.sequence).stored == []


def test_a_delta_gives_each_hash_its_last_change():
    events = CacheEvents()
    events.stored(7)
    seen = events.since("", 0)
    events.removed(7)
    events.stored(7)
    events.stored(8)
    events.removed(8)
    delta = events.since(seen.epoch, seen.sequence)
    assert delta.stored == [7] and delta.removed == [8]
    assert held_after([seen, delta]) == {7}


def test_a_router_behind_the_log_or_of_another_epoch_resyncs():
    events = CacheEvents(log_size=4)
    events.stored(1)
    seen = events.since("", 0)
    for h in range(10, 20):
        events.stored(h)
        events.removed(h)
    behind = events.since(seen.epoch, seen.sequence)
    assert behind.full and behind.stored == [1]
    restarted = events.since("another epoch", behind.sequence)
    assert restarted.full and restarted.stored == [1]


def test_the_block_manager_reports_what_it_registers_and_evicts():
    bm = BlockManager(4, 4, prefix_caching=True)
    seq = Sequence("a", list(range(12)), SamplingParams())
    bm.allocate(seq)
    seq.num_cached_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    bm.deallocate(seq)
    seen = bm.events.since("", 0)
    assert set(seen.stored) == set(block_hashes(list(range(12)), 4))
    bm.take(3)  # one fresh block, then two cached ones evicted
    delta = bm.events.since(seen.epoch, seen.sequence)
    assert len(delta.removed) == 2 and held_after([seen, delta]) == set(bm.block_of_hash)


def test_without_prefix_caching_nothing_is_reported():
    bm = BlockManager(4, 4)
    seq = Sequence("a", list(range(12)), SamplingParams())
    bm.allocate(seq)
    seq.num_cached_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    assert bm.events.since("", 0).stored == []
