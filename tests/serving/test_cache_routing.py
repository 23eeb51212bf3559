"""Cache-aware routing over 2 prompt + 2 token workers: several multi-turn conversations, interleaved turn
by turn, find at least 80% of their cacheable prompt tokens cached (`usage.prompt_tokens_details
.cached_tokens`) with the router's default `cacheAware`, and fewer through a second router over the same
workers with `--routing leastLoaded`; a turn under another `cache_salt` finds none. Each run salts its
requests afresh, so that the runs and earlier tests share no cached block."""

import uuid

import openai
import pytest
from support import prom
from support.serving import another_router, metrics
from support.words import WORDS

from phasesplit.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

BLOCK_SIZE = 16            # the engine's default, as the session clusters run it
CONVERSATIONS = 5          # odd: taking turns, leastLoaded does not keep each conversation on one worker
TURNS = 4


@pytest.fixture(scope="module")
def least_loaded_router(clusters, tmp_path_factory):
    """A second router over the split cluster's workers, routing by load alone."""
    with another_router(clusters[0], "router-least-loaded", tmp_path_factory.mktemp("router-ll"),
                        ("--routing", "leastLoaded")) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


def client_at(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def words(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


def cacheable(ids: list[int], earlier: list[list[int]]) -> int:
    """The prompt tokens an earlier prompt of the conversation computed: their longest shared prefix, in full
    blocks, short of the last token (always computed)."""
    shared = max((_common_prefix(ids, e) for e in earlier), default=0)
    return min(shared, len(ids) - 1) // BLOCK_SIZE * BLOCK_SIZE


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def converse(client: openai.OpenAI, tokenizer: Tokenizer, salt: str) -> tuple[int, int, int]:
    """Interleaved conversations, each turn answered before the next is sent: (cached, cacheable, prompt) tokens."""
    histories = [[{"role": "system", "content": f"conversation {c}: " + words(c, 150)}] for c in range(CONVERSATIONS)]
    earlier: list[list[list[int]]] = [[] for _ in histories]
    cached = cacheable_tokens = prompt = 0
    for turn in range(TURNS):
        for c, history in enumerate(histories):
            history.append({"role": "user", "content": f"turn {turn}: " + words(c + turn, 20)})
            reply = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0,
                                                   extra_body={"cache_salt": salt})
            ids = tokenizer.encode_chat(history)
            assert reply.usage.prompt_tokens == len(ids)
            cached += reply.usage.prompt_tokens_details.cached_tokens
            cacheable_tokens += cacheable(ids, earlier[c])
            prompt += len(ids)
            earlier[c].append(ids)
            history.append({"role": "assistant", "content": reply.choices[0].message.content})
    return cached, cacheable_tokens, prompt


def router_counts(base_url: str) -> tuple[float, float]:
    """The prefix-cache (queries, hits) in tokens the router counted over all workers."""
    samples = metrics(base_url)
    return (prom.value(samples, "phasesplit_prefix_cache_queries_total"),
            prom.value(samples, "phasesplit_prefix_cache_hits_total"))


def test_cache_aware_routing_finds_the_conversations_cached_and_least_loaded_less(split, least_loaded_router,
                                                                                     tokenizer):
    before = router_counts(split.base_url)
    with client_at(split.base_url) as client:
        aware, aware_cacheable, aware_prompt = converse(client, tokenizer, uuid.uuid4().hex)
    queries, hits = router_counts(split.base_url)
    with client_at(least_loaded_router) as client:
        least, least_cacheable, _ = converse(client, tokenizer, uuid.uuid4().hex)
    assert aware_cacheable == least_cacheable > 0
    assert aware >= 0.8 * aware_cacheable, (aware, aware_cacheable)
    assert least < aware, (least, aware)
    assert (queries - before[0], hits - before[1]) == (aware_prompt, aware)   # the router's /metrics agree


def test_a_turn_under_another_salt_finds_nothing_cached(split):
    history = [{"role": "system", "content": words(3, 150)}, {"role": "user", "content": words(4, 20)}]
    with client_at(split.base_url) as client:
        def cached(salt: str) -> int:
            reply = client.chat.completions.create(model="tiny", messages=history, max_tokens=4, temperature=0,
                                                   extra_body={"cache_salt": salt})
            return reply.usage.prompt_tokens_details.cached_tokens
        salt = uuid.uuid4().hex
        assert cached(salt) == 0
        assert cached(salt) > 0            # the router sends the repeat where the blocks are
        assert cached(uuid.uuid4().hex) == 0
