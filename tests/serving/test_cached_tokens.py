"""Prefix caching through the official openai client: a repeated prompt reports the tokens it did not
compute in `usage.prompt_tokens_details.cached_tokens` (streamed usage too), and a request under another
`cache_salt` finds none of them. Each test salts its requests afresh, so earlier requests cannot warm it."""

import urllib.request
import uuid

import openai
import pytest
from support.prom import parse, value

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "You are terse. " * 12},
            {"role": "user", "content": "Say hello to the pools, and to the blocks they cache."}]
PROMPT = "the quick brown fox jumps over the lazy dog " * 8


def client_of(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.endpoint, api_key="unused", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, salt: str, stream: bool = False):
    """The usage of one greedy chat request under `salt`."""
    args = dict(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, extra_body={"cache_salt": salt})
    if not stream:
        return client.chat.completions.create(**args).usage
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    return chunks[-1].usage


def test_a_repeated_chat_reports_cached_tokens_and_another_salt_none(mixed):
    salt = uuid.uuid4().hex
    with client_of(mixed) as client:
        first = chat(client, salt)
        second = chat(client, salt)
        streamed = chat(client, salt, stream=True)
        other = chat(client, uuid.uuid4().hex)
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = second.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.prompt_tokens and cached % 16 == 0
    assert streamed.prompt_tokens_details.cached_tokens == cached
    assert other.prompt_tokens_details.cached_tokens == 0 and other.prompt_tokens == first.prompt_tokens


def worker_counts(cluster) -> tuple[float, float]:
    """The prefix cache's (queries, hits) in tokens, from the one worker's /metrics."""
    (address,) = cluster.metrics_addresses()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        samples = parse(reply.read().decode())
    return (value(samples, "phasesplit_worker_prefix_cache_queries_total"),
            value(samples, "phasesplit_worker_prefix_cache_hits_total"))


def test_the_worker_counts_the_tokens_it_looked_up_and_found(mixed):
    salt = uuid.uuid4().hex
    with client_of(mixed) as client:
        first = chat(client, salt)
        queries, hits = worker_counts(mixed)
        second = chat(client, salt)
    after = worker_counts(mixed)
    assert after == (queries + second.prompt_tokens, hits + second.prompt_tokens_details.cached_tokens)
    assert second.prompt_tokens_details.cached_tokens > 0 and first.prompt_tokens == second.prompt_tokens


def test_split_workers_report_what_the_prompt_worker_found_cached(split):
    """Three completions of one prompt over two prompt workers: at least one lands where it ran before."""
    salt = uuid.uuid4().hex
    with client_of(split) as client:
        replies = [client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                             extra_body={"cache_salt": salt, "ignore_eos": True}) for _ in range(3)]
    cached = [reply.usage.prompt_tokens_details.cached_tokens for reply in replies]
    assert cached[0] == 0 and max(cached) > 0, cached
    assert len({reply.choices[0].text for reply in replies}) == 1  # the cached KV sent on gives the same text


@pytest.mark.parametrize(("salt", "message"), [
    ("", "must not be empty"), ("x" * 1025, "must be at most 1024 characters"), (7, "must be a string")])
def test_a_bad_cache_salt_is_a_400_naming_the_field(mixed, salt, message):
    with client_of(mixed) as client, pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"cache_salt": salt})
    assert caught.value.body["param"] == "cache_salt"
    assert caught.value.body["message"].startswith(f"cache_salt: {message}")
