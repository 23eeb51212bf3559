"""The router's own counts of a worker's load balance on every path a request leaves it by."""

import pytest

from phasesplit.router.workers import WorkerState


def counts(w: WorkerState) -> tuple[int, int, int]:
    return w.inflight, w.pending_tokens, -w.free_blocks   # free_blocks: polled (none yet) less reservations


async def test_an_assignment_counts_until_its_block_ends_even_when_it_fails():
    w = WorkerState("a:1", "token")
    try:
        with pytest.raises(RuntimeError):
            with w.assign("r1", prompt_tokens=40, kv_blocks=3):
                assert counts(w) == (1, 40, 3)
                raise RuntimeError("the worker failed the request")
        assert counts(w) == (0, 0, 0)
    finally:
        await w.close()


async def test_prompt_tokens_stop_counting_once_the_worker_took_the_prompt_in():
    w = WorkerState("a:1", "mixed")
    try:
        with w.assign("r1", prompt_tokens=40) as assignment:
            assignment.prompt_done()
            assignment.prompt_done()   # each output event says so again: counted once
            assert counts(w) == (1, 0, 0)
        assert counts(w) == (0, 0, 0)
    finally:
        await w.close()
