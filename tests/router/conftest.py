"""Fixtures: fake workers on real gRPC ports and the real router app on a real HTTP port."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
import pytest
from support import prom
from support.fake_worker import ADMIN_TOKEN, MODEL, FakeWorker

from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.router.app import ROUTER, Router, RouterSettings, create_app
from phasesplit.router.dispatch import MigrationPolicy
from phasesplit.router.main import start_server
from phasesplit.router.pools import WorkerSpec
from phasesplit.router.tokenizer_source import TokenizerSource
from phasesplit.router.waiting import QueueSettings


@dataclass
class Cluster:
    url: str
    router: Router
    workers: dict[str, list[FakeWorker]] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def all_workers(self) -> list[FakeWorker]:
        return [w for ws in self.workers.values() for w in ws]

    async def polled(self) -> None:
        """Returns once the router has polled every worker again: it sees what the test just changed."""
        await self.router.pools.next_poll()

    async def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels): value} from GET /metrics, parsed by prometheus_client."""
        async with aiohttp.ClientSession() as session, session.get(self.url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        return prom.parse(text)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture
async def start_worker(tokenizer):
    """Starts fake workers outside any cluster (to add to a pool later); stops them after the test."""
    started: list[FakeWorker] = []

    async def start(role: str, **options) -> FakeWorker:
        worker = FakeWorker(role, tokenizer, **options)
        await worker.start()
        started.append(worker)
        return worker
    yield start
    for worker in started:
        await worker.stop()


@pytest.fixture
async def spare_worker(start_worker):
    return await start_worker("mixed")


@pytest.fixture
async def make_cluster(tokenizer, tiny_model_dir):
    started: list = []

    async def make(prompt: int = 1, token: int = 1, mixed: int = 0, api_key: str | None = None,
                   admin_token: str | None = ADMIN_TOKEN,
                   max_model_len: int = 2048, worker_options: dict | None = None,
                   extra_specs: dict[str, list[str]] | None = None,
                   migration: MigrationPolicy = MigrationPolicy(stall_timeout=1.0),
                   queue: QueueSettings = QueueSettings(), served: tuple[str, ...] | None = None,
                   tokenizer_from_workers: bool = False, **limits) -> Cluster:
        """`limits`: more RouterSettings (admission, header_timeout, body_timeout)."""
        workers: dict[str, list[FakeWorker]] = {}
        for pool, count in (("prompt", prompt), ("token", token), ("mixed", mixed)):
            workers[pool] = [FakeWorker(pool, tokenizer, **(worker_options or {})) for _ in range(count)]
            for w in workers[pool]:
                await w.start()
                started.append(w)
        specs = {pool: [WorkerSpec.parse(w.address) for w in ws] for pool, ws in workers.items()}
        for pool, entries in (extra_specs or {}).items():
            specs[pool] += [WorkerSpec.parse(e) for e in entries]
        if tokenizer_from_workers:   # as in a cluster: no model directory, the workers tell
            tokenizers, max_model_len = TokenizerSource(), None
        else:
            tokenizers = TokenizerSource.from_dir(tiny_model_dir)
        settings = RouterSettings(served_model_name=MODEL, max_model_len=max_model_len, api_key=api_key,
                                  admin_token=admin_token, workers=specs, poll_interval=0.1, dns_interval=0.2,
                                  migration=migration, queue=queue, pools=served, **limits)
        app = create_app(settings, tokenizers)
        runner, port = await start_server(app, "127.0.0.1", 0)
        started.append(runner)
        return Cluster(f"http://127.0.0.1:{port}", app[ROUTER], workers)

    yield make
    for thing in reversed(started):
        await (thing.cleanup() if hasattr(thing, "cleanup") else thing.stop())
