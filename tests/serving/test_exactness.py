"""Split serving computes what colocated serving computes: same greedy tokens, request by request."""

import asyncio

import pytest

from support.completions import complete_all, prompts

pytestmark = pytest.mark.slow


def test_40_concurrent_greedy_requests_match_one_mixed_worker(split, mixed):
    jobs = prompts(40)
    through_split = asyncio.run(complete_all(split.base_url, jobs))
    through_mixed = asyncio.run(complete_all(mixed.base_url, jobs))
    for i, (got, want) in enumerate(zip(through_split, through_mixed)):
        assert got == want, f"request {i}: split {got!r} != mixed {want!r}"
    assert sum(n for _, n, _ in through_split) >= 40 * 4
