"""Pool membership: `host:port` and `dns:NAME:PORT` entries, re-resolved and polled in the background."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from phasesplit.router.metrics import POOLS, RouterMetrics
from phasesplit.router.scheduling import Turns
from phasesplit.router.workers import WorkerState, any_tokenizer

if TYPE_CHECKING:
    from phasesplit.router.tokenizer_source import TokenizerSource

log = logging.getLogger(__name__)
ROUTE_POOLS = {"split": ("prompt", "token"), "mixed": ("mixed",)}


@dataclass(frozen=True)
class WorkerSpec:
    """One entry of a worker list: a fixed address, or a DNS name (a headless Service) to resolve."""

    host: str
    port: int
    dns: bool = False

    @classmethod
    def parse(cls, entry: str) -> "WorkerSpec":
        text = entry.strip()
        dns = text.startswith("dns:")
        rest = text[4:] if dns else text
        host, sep, port = rest.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"worker {entry!r}: expected host:port or dns:NAME:PORT with a port in 1..65535")
        return cls(host, int(port), dns)

    def __str__(self) -> str:
        return f"{'dns:' if self.dns else ''}{_join(self.host, self.port)}"


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_worker_list(text: str | None) -> list[WorkerSpec]:
    return [WorkerSpec.parse(e) for e in (text or "").split(",") if e.strip()]


async def resolve(spec: WorkerSpec, previous: set[str]) -> set[str]:
    """The addresses behind one spec; a DNS name that does not exist has none, a DNS outage keeps `previous`."""
    if not spec.dns:
        return {_join(spec.host, spec.port)}
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return set()
        log.warning("resolving %s failed (%s); keeping %d workers", spec, e, len(previous))
        return previous
    return {_join(info[4][0], spec.port) for info in infos}


class Pool:
    def __init__(self, name: str, specs: list[WorkerSpec], accepts_tokenizer: Callable[[str], bool]):
        self.name, self.specs, self.accepts_tokenizer = name, specs, accepts_tokenizer
        self.workers: dict[str, WorkerState] = {}
        self.retired: list[WorkerState] = []
        self._resolved: dict[WorkerSpec, set[str]] = {}

    async def reconcile(self, metrics: RouterMetrics) -> None:
        resolved = {s: await resolve(s, self._resolved.get(s, set())) for s in self.specs}
        self._resolved = resolved
        wanted = set().union(*resolved.values()) if resolved else set()
        for address in wanted - self.workers.keys():
            self.workers[address] = WorkerState(address, self.name, self.accepts_tokenizer)
            log.info("%s pool: added worker %s", self.name, address)
        for address in self.workers.keys() - wanted:
            self.retired.append(self.workers.pop(address))
            metrics.forget_worker(address)
            log.info("%s pool: removed worker %s", self.name, address)
        metrics.pool_workers.labels(pool=self.name).set(len(self.workers))

    def routable(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.routable]

    async def close_retired(self, force: bool = False) -> None:
        done = [w for w in self.retired if force or w.inflight == 0]
        self.retired = [w for w in self.retired if w not in done]
        for w in done:
            await w.close()

    def describe(self) -> dict:
        """Members, and the removed workers still finishing this router's requests ("retiring")."""
        return {"specs": [str(s) for s in self.specs], "workers": [w.describe() for w in self.workers.values()],
                "retiring": [w.describe() for w in self.retired]}


class Pools:
    """The three pools, kept resolved and polled by one background task."""

    def __init__(self, specs: dict[str, list[WorkerSpec]], metrics: RouterMetrics,
                 poll_interval: float = 0.5, dns_interval: float = 5.0, poll_timeout: float = 1.0,
                 served: tuple[str, ...] | None = None, tokenizer: "TokenizerSource | None" = None):
        self.tokenizer = tokenizer   # workers get work only when they serve its tokenizer
        accepts = tokenizer.accepts if tokenizer else any_tokenizer
        self.pools = {name: Pool(name, list(specs.get(name, [])), accepts) for name in POOLS}
        # the pools this deployment has, even at 0 workers (default: those given a worker entry)
        self.served = set(served if served is not None else (name for name in POOLS if specs.get(name)))
        self.turns = Turns()   # equal workers take turns
        self._changed = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []   # called at every change of the workers' states
        self._rounds_begun = self._round_done = 0   # full poll rounds of all workers
        self.metrics = metrics
        self.poll_interval, self.dns_interval, self.poll_timeout = poll_interval, dns_interval, poll_timeout
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def __getitem__(self, name: str) -> Pool:
        return self.pools[name]

    async def start(self) -> None:
        await self.refresh(resolve_dns=True)
        self._task = asyncio.create_task(self._run(), name="pools")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pool in self.pools.values():
            pool.retired.extend(pool.workers.values())
            pool.workers.clear()
            await pool.close_retired(force=True)

    async def set_members(self, name: str, specs: list[WorkerSpec]) -> Pool:
        pool = self.pools[name]
        async with self._lock:
            pool.specs = specs
            await pool.reconcile(self.metrics)
        await self._poll(pool.workers.values())
        self.notify()
        return pool

    async def refresh(self, resolve_dns: bool) -> None:
        """One full round: the members resolved (with `resolve_dns`), retired workers closed, every worker polled."""
        self._rounds_begun += 1
        number = self._rounds_begun
        async with self._lock:
            for pool in self.pools.values():
                if resolve_dns:
                    await pool.reconcile(self.metrics)
                await pool.close_retired()
        await self._poll([w for p in self.pools.values() for w in p.workers.values()])
        self._round_done = number
        self.notify()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_dns = loop.time() + self.dns_interval
        while True:
            await asyncio.sleep(self.poll_interval)
            resolve_dns = loop.time() >= next_dns
            if resolve_dns:
                next_dns = loop.time() + self.dns_interval
            try:
                await self.refresh(resolve_dns)
            except Exception:
                log.exception("refreshing the pools failed")

    async def _poll(self, workers) -> None:
        workers = list(workers)
        await asyncio.gather(*(w.poll(self.poll_timeout) for w in workers))
        members = {id(w) for pool in self.pools.values() for w in pool.workers.values()}
        for w in workers:
            if w.load is not None and id(w) in members:   # one removed while it was polled keeps no gauge
                self.metrics.set_worker_load(w.address, w.load)
        for pool in self.pools.values():
            loads = [w.load for w in pool.workers.values() if w.load is not None]
            total = sum(x.kv_blocks_used + x.kv_blocks_free for x in loads)
            used = sum(x.kv_blocks_used for x in loads)
            self.metrics.kv_utilization.labels(pool=pool.name).set(used / total if total else 0.0)

    def notify(self) -> None:
        """Wakes whoever waits for a route or a poll: the workers' states have changed."""
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self.listeners:
            listener()

    async def changed(self) -> None:
        """Completes at the next change of the workers' states (a poll, or a new tokenizer)."""
        await self._changed.wait()

    async def next_poll(self) -> None:
        """Completes once a full poll round of the workers, begun after this call, has ended."""
        wanted = self._rounds_begun + 1
        while self._round_done < wanted:
            await self._changed.wait()

    async def wait_for_route(self) -> str:
        while (route := self.route()) is None:
            await self._changed.wait()
        return route

    # ---- routes ----
    def route(self) -> str | None:
        """'split' when prompt and token workers can serve, else 'mixed' when mixed workers can, else None."""
        if self["prompt"].routable() and self["token"].routable():
            return "split"
        if self["mixed"].routable():
            return "mixed"
        return None

    def expected_route(self) -> str | None:
        """The route this deployment's pools make when they have workers: what an empty pool waits for."""
        for route, pools in ROUTE_POOLS.items():
            if self.served.issuperset(pools):
                return route
        return None

    def scaled_to_zero(self) -> list[str]:
        """The expected route's pools without a ready worker, when none of them has a member at all."""
        expected = self.expected_route()
        idle = [p for p in ROUTE_POOLS.get(expected, ()) if not self[p].routable()]
        return idle if idle and not any(self[p].workers for p in idle) else []

    def why_not(self) -> str:
        parts = [problem] if self.tokenizer and (problem := self.tokenizer.why_not()) else []
        for pool in self.pools.values():
            if not pool.workers:
                parts.append(f"{pool.name} pool: no workers")
            elif not pool.routable():
                errors = sorted({w.why_not_routable() for w in pool.workers.values()})
                parts.append(f"{pool.name} pool: no ready worker ({'; '.join(errors)})")
        return "no route can serve: needs a ready prompt and token worker, or a ready mixed worker; " + ", ".join(parts)

    def describe(self) -> dict:
        return {name: pool.describe() for name, pool in self.pools.items()}
