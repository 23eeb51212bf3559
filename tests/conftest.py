"""Fixtures shared by every test suite (importable without transformers)."""

import pytest
import pytest_asyncio
from support.router_metrics import FakeRouterMetrics

from phasesplit.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The `tiny` preset, seed 0: a random Llama checkpoint with a trained BPE tokenizer and chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0, preset="tiny")


@pytest_asyncio.fixture
async def router_metrics():
    """A fake router's /metrics (what the operator's and local mode's autoscalers read)."""
    fake = FakeRouterMetrics()
    fake.url = await fake.start()
    yield fake
    await fake.stop()
