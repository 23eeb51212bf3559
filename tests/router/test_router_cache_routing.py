"""Cache-aware routing against fake workers that report a prefix cache on their Load polls: a prompt goes
to the prompt worker holding it even when that one is busier, leastLoaded ignores the caches, a worker
hashing otherwise is never routed by its cache (one warning), and the router counts each worker's hits."""

import asyncio
import logging

import openai
import pytest
from support.fake_worker import BLOCK_SIZE, MODEL
from support.polling import eventually

from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.prefix_hash import HASH_NAME, block_hashes
from phasesplit.router.cache_routing import LEAST_LOADED, RoutingSettings
from phasesplit.router.cache_view import CacheView, PromptHashes
from phasesplit.router.request import MigrationPolicy
from phasesplit.v1 import worker_pb2 as pb

PROMPT = "the quick brown fox jumps over the lazy dog " * 12


def client(cluster):
    return openai.AsyncOpenAI(base_url=cluster.base_url, api_key="x", max_retries=0)


async def complete(cluster, salt: str = "s"):
    reply = await client(cluster).completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                                     extra_body={"ignore_eos": True, "cache_salt": salt})
    return reply.usage.prompt_tokens_details.cached_tokens


def prompt_hashes(tiny_model_dir, salt: str = "s") -> list[int]:
    ids = Tokenizer.from_dir(tiny_model_dir).encode(PROMPT)
    return block_hashes(ids, BLOCK_SIZE, salt)


async def holder_and_idle(make_cluster, tiny_model_dir, prefix_hash=HASH_NAME, **settings):
    """Two prompt workers: the first holds the prompt cached but has a queue, the second is idle."""
    cluster = await make_cluster(prompt=2, token=1, worker_options={"prefix_hash": prefix_hash}, **settings)
    holder, idle = cluster.workers["prompt"]
    holder.cached_hashes.update(prompt_hashes(tiny_model_dir))
    holder.extra_waiting_tokens = 50
    await cluster.polled()
    return cluster, holder, idle


async def test_a_prompt_goes_to_the_worker_whose_cache_holds_it(make_cluster, tiny_model_dir):
    cluster, holder, idle = await holder_and_idle(make_cluster, tiny_model_dir)
    cached = [await complete(cluster) for _ in range(3)]
    assert (len(holder.prefills), len(idle.prefills)) == (3, 0)
    assert all(c > 0 for c in cached)
    metrics = await cluster.metrics()
    hits = metrics[("phasesplit_prefix_cache_hits_total", (("worker", holder.address),))]
    queries = metrics[("phasesplit_prefix_cache_queries_total", (("worker", holder.address),))]
    assert hits == sum(cached) and queries == 3 * len(holder.prefills[0].prompt_token_ids)


async def test_the_prompt_queue_counts_only_the_tokens_the_worker_will_compute(make_cluster, tiny_model_dir):
    """The autoscaler's queueTokens: a prompt the chosen worker holds cached (all but its last block)
    queues only its uncached tail."""
    cluster = await make_cluster(prompt=1, token=1, worker_options={"prefix_hash": HASH_NAME, "prefill_delay": 1.0})
    holder = cluster.workers["prompt"][0]
    holder.cached_hashes.update(prompt_hashes(tiny_model_dir))
    await cluster.polled()
    request = asyncio.create_task(complete(cluster))
    prompt_pool = (("pool", "prompt"),)

    async def queued_requests():
        return (await cluster.metrics())[("phasesplit_queue_requests", prompt_pool)] == 1
    await eventually(queued_requests, what="the prompt in the prompt phase")
    queued = (await cluster.metrics())[("phasesplit_queue_tokens", prompt_pool)]
    cached = await request
    assert 0 < cached and 0 < queued == len(holder.prefills[0].prompt_token_ids) - cached


async def test_another_salt_finds_no_cache_and_goes_by_load(make_cluster, tiny_model_dir):
    cluster, holder, idle = await holder_and_idle(make_cluster, tiny_model_dir)
    assert await complete(cluster, salt="another tenant") == 0
    assert (len(holder.prefills), len(idle.prefills)) == (0, 1)


async def test_least_loaded_ignores_the_caches(make_cluster, tiny_model_dir):
    cluster, holder, idle = await holder_and_idle(make_cluster, tiny_model_dir,
                                                  routing=RoutingSettings(policy=LEAST_LOADED))
    await complete(cluster)
    assert (len(holder.prefills), len(idle.prefills)) == (0, 1)


async def test_a_worker_hashing_otherwise_is_not_routed_by_its_cache(make_cluster, tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="phasesplit.router.workers"):
        cluster, holder, idle = await holder_and_idle(make_cluster, tiny_model_dir, prefix_hash="xxh3-64")
        await cluster.polled()
    await complete(cluster)
    assert (len(holder.prefills), len(idle.prefills)) == (0, 1)
    warnings = [r.getMessage() for r in caplog.records if "xxh3-64" in r.getMessage()]
    assert all("not routed by its cache" in w for w in warnings)
    assert sorted(w.split()[1] for w in warnings) == sorted(w.address for w in cluster.all_workers())   # one each


async def test_the_token_worker_holding_the_prompt_takes_it_though_it_has_less_room(make_cluster, tiny_model_dir):
    cluster = await make_cluster(prompt=1, token=2, worker_options={"prefix_hash": HASH_NAME})
    holder, roomy = cluster.workers["token"]
    holder.cached_hashes.update(prompt_hashes(tiny_model_dir))
    holder.num_kv_blocks = 500   # a leastLoaded pick takes the worker with more free blocks
    await cluster.polled()
    await complete(cluster)
    assert (len(holder.generates), len(roomy.generates)) == (1, 0)


async def test_a_token_worker_holding_all_but_a_short_tail_computes_it_itself(make_cluster, tiny_model_dir):
    """Conditional disaggregation (localPrefillTokens): no prompt worker, no KV transfer; a longer tail, or
    the setting at 0, goes through the prompt worker as before."""
    cluster = await make_cluster(prompt=1, token=1, worker_options={"prefix_hash": HASH_NAME},
                                 routing=RoutingSettings(local_prefill_tokens=64))
    (token,), (prompt,) = cluster.workers["token"], cluster.workers["prompt"]
    token.cached_hashes.update(prompt_hashes(tiny_model_dir))   # all but the block of the last token
    await cluster.polled()
    await complete(cluster)
    assert (len(prompt.prefills), [list(g.prompt_token_ids) != [] for g in token.generates]) == (0, [True])
    await complete(cluster, salt="another tenant")   # nothing cached under this salt: split as before
    assert (len(prompt.prefills), [list(g.prompt_token_ids) != [] for g in token.generates]) == (1, [True, False])


async def test_the_prompt_worker_is_told_the_blocks_the_token_worker_holds(make_cluster, tiny_model_dir):
    cluster = await make_cluster(prompt=1, token=1, worker_options={"prefix_hash": HASH_NAME})
    (token,), (prompt,) = cluster.workers["token"], cluster.workers["prompt"]
    held = prompt_hashes(tiny_model_dir)[:3]
    token.cached_hashes.update(held)
    await cluster.polled()
    await complete(cluster)
    await complete(cluster, salt="another tenant")
    assert [p.token_cached_blocks for p in prompt.prefills] == [3, 0]


async def test_the_next_turn_counts_on_blocks_the_token_worker_reported_only_after_decoding(make_cluster,
                                                                                          tiny_model_dir):
    """Polls answered while the first request decodes report none of its prompt's blocks yet (the worker
    caches them as it decodes): the next request with the prompt still counts on them."""
    cluster = await make_cluster(prompt=1, token=1, worker_options={"prefix_hash": HASH_NAME, "token_delay": 1.0})
    (token,), (prompt,) = cluster.workers["token"], cluster.workers["prompt"]
    first = asyncio.create_task(complete(cluster))
    await eventually(lambda: token.active, what="the first request decoding")
    await cluster.polled()
    assert not token.cached_hashes and not first.done()
    await first
    await complete(cluster)
    full_blocks_before_the_last_token = (len(prompt.prefills[0].prompt_token_ids) - 1) // BLOCK_SIZE
    assert [p.token_cached_blocks for p in prompt.prefills] == [0, full_blocks_before_the_last_token]


async def test_blocks_evicted_since_the_poll_are_sent_after_all(make_cluster, tiny_model_dir):
    """The token worker refuses KV that counts on blocks it no longer holds: the router retries the request with
    every block, on the same token worker, and counts a kv_cache_miss; the retry is not a failure's (a router
    that retries no failure before output still makes it)."""
    cluster = await make_cluster(prompt=1, token=1, worker_options={"prefix_hash": HASH_NAME},
                                 migration=MigrationPolicy(stall_timeout=1.0, retries_before_output=0))
    (token,), (prompt,) = cluster.workers["token"], cluster.workers["prompt"]
    token.cached_hashes.update(prompt_hashes(tiny_model_dir))
    token.evicted = True
    await cluster.polled()
    await complete(cluster)
    assert [p.token_cached_blocks > 0 for p in prompt.prefills] == [True, False]
    assert len(token.generates) == 1
    metrics = await cluster.metrics()
    assert metrics[("phasesplit_migrations_total", (("reason", "kv_cache_miss"), ("stage", "before_output")))] == 1


async def test_a_refused_push_that_counted_on_no_held_blocks_is_a_failure_like_any_other(make_cluster):
    """NOT_FOUND from a token worker the router said nothing was held on is no cache miss: each retry counts,
    and the request fails once they are spent instead of retrying for ever."""
    cluster = await make_cluster(prompt=1, token=1, worker_options={"prefix_hash": HASH_NAME})
    (token,), (prompt,) = cluster.workers["token"], cluster.workers["prompt"]
    token.refuse_pushes = True
    with pytest.raises(openai.APIStatusError):
        await complete(cluster)
    assert [p.token_cached_blocks for p in prompt.prefills] == [0]   # its one token worker was then excluded
    metrics = await cluster.metrics()
    assert metrics[("phasesplit_migrations_total", (("reason", "kv_cache_miss"), ("stage", "before_output")))] == 0


def summary(full: bool, stored=(), removed=(), epoch="e1", sequence=1) -> pb.PrefixCacheSummary:
    return pb.PrefixCacheSummary(epoch=epoch, sequence=sequence, full=full, stored=stored, removed=removed)


def test_the_view_follows_deltas_and_resyncs():
    view = CacheView()
    assert view.request().cache_epoch == ""
    view.apply(summary(True, [1, 2, 3]), poll=1)
    view.apply(summary(False, [4], [2], sequence=2), poll=2)
    assert view.held == {1, 3, 4} and view.request().cache_sequence == 2
    view.apply(summary(False, [9], epoch="e2", sequence=1), poll=3)   # restarted: whatever it says is all
    assert view.held == {9}


def test_expected_blocks_count_until_a_later_poll_reports_the_truth():
    view = CacheView()
    view.apply(summary(True, []), poll=1)
    view.expect([5, 6], polls_begun=1)         # sent while poll 1 was under way
    assert view.cached_blocks([5, 6, 7]) == 2
    view.apply(summary(True, [5]), poll=1)
    assert view.cached_blocks([5, 6]) == 2
    view.apply(summary(True, [5]), poll=2)     # begun after the prompt ran: it knows
    assert view.cached_blocks([5, 6]) == 1


def test_prompt_hashes_leave_out_the_block_of_the_last_token():
    hashes = PromptHashes(list(range(32)), None)
    assert len(hashes.full(16)) == 2 and len(hashes.lookup(16)) == 1
    assert PromptHashes(list(range(33)), "salt").lookup(16) == block_hashes(list(range(33)), 16, "salt")


@pytest.mark.parametrize(("flags", "message"), [
    (["--routing", "fastest"], "invalid choice"),
    (["--routing-cache-threshold", "1.5"], "--routing-cache-threshold must be in [0, 1]")])
def test_bad_routing_flags_are_refused_by_name(flags, message, capsys):
    from phasesplit.router.main import build_parser, settings_from_args
    with pytest.raises(SystemExit) as stop:
        settings_from_args(build_parser().parse_args(["--served-model-name", "m", *flags]))
    assert message in str(stop.value) + capsys.readouterr().err
