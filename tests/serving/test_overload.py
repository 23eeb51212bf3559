"""Overload is refused, not queued: 120 streams at one prompt and one token worker (a batch of 16) with
`maxQueueWaitSeconds: 5` are each served to their end or refused with a 429 carrying Retry-After,
the refusals no later than the wait allows; nothing else (no 503, no broken stream, no KV left)."""

import asyncio

import pytest
from support.overload import BATCH, burst, overload_manifest
from support.serving import start_cluster, wait_quiet

pytestmark = pytest.mark.slow

MAX_QUEUE_WAIT = 5.0
REFUSAL_SLACK = 10.0  # a loaded 2-core machine's scheduling delay on top of the wait


@pytest.fixture(scope="module")
def small(tiny_model_dir, tmp_path_factory):
    cluster = start_cluster(overload_manifest("overload", MAX_QUEUE_WAIT), tiny_model_dir,
                            tmp_path_factory.mktemp("overload-logs"))
    try:
        yield cluster
    finally:
        cluster.stop(15)


def test_a_burst_beyond_the_batch_is_served_or_refused_with_429(small):
    outcomes = asyncio.run(burst(small.base_url, 120, max_tokens=400))
    served = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    assert len(served) + len(refused) == len(outcomes), sorted({o.status for o in outcomes})
    assert all(o.tokens == 400 for o in served), "a served stream ended early"
    assert len(served) >= BATCH, "the batch's worth of requests was admitted"
    assert refused, "nothing was refused: the burst did not exceed what could start within the wait"
    assert all(o.retry_after and int(o.retry_after) >= 1 for o in refused)
    assert max(o.seconds for o in refused) <= MAX_QUEUE_WAIT + REFUSAL_SLACK
    state = wait_quiet(small, timeout=20)
    assert all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight"), state
