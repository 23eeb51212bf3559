import pytest_asyncio

from support.router_metrics import FakeRouterMetrics


@pytest_asyncio.fixture
async def router_metrics():
    fake = FakeRouterMetrics()
    fake.url = await fake.start()
    yield fake
    await fake.stop()
