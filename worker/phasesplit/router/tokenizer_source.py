"""The router's tokenizer: read from a model directory (`--model`), or fetched from a ready worker
(`Worker.TokenizerFiles`), so that a router in a cluster needs no copy of the model.

Token ids mean something only to the tokenizer that made them, so the router sends work only to
workers that report its tokenizer's digest (or none). A fetched tokenizer follows the workers: when
no route can be made of workers with its digest and one can be made of workers with another (a model
rollout has gone far enough), the router fetches that one.
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc

from phasesplit.engine.tokenizer import Tokenizer, read_tokenizer_files, tokenizer_digest
from phasesplit.router.pools import ROUTE_POOLS, Pools
from phasesplit.router.workers import WorkerState
from phasesplit.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)


class TokenizerSource:
    def __init__(self, tokenizer: Tokenizer | None = None, digest: str = "", max_model_len: int | None = None):
        self.tokenizer, self.digest, self.max_model_len = tokenizer, digest, max_model_len
        self.fixed = tokenizer is not None   # read from a directory: kept for the router's life
        self.error = "no ready worker to read it from yet"
        self._task: asyncio.Task | None = None

    @classmethod
    def from_dir(cls, model_dir) -> "TokenizerSource":
        files = read_tokenizer_files(model_dir)
        if "tokenizer.json" not in files:
            raise FileNotFoundError(f"tokenizer.json not found in model directory {model_dir}")
        return cls(Tokenizer.from_files(files), tokenizer_digest(files))

    def accepts(self, worker_digest: str) -> bool:
        """Whether token ids from this tokenizer may go to a worker that reports `worker_digest`."""
        return self.tokenizer is not None and (not worker_digest or not self.digest or worker_digest == self.digest)

    def why_not(self) -> str | None:
        return None if self.tokenizer else f"the router has no tokenizer: {self.error}"

    # ---- following the workers ----
    def start(self, pools: Pools) -> None:
        if not self.fixed:
            self._task = asyncio.create_task(self._follow(pools), name="tokenizer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self, pools: Pools) -> None:
        while True:
            await pools.changed()
            try:
                if await self.update(pools):
                    pools.notify()
            except Exception:
                log.exception("following the workers' tokenizer failed")

    async def update(self, pools: Pools, timeout: float = 30.0) -> bool:
        """Fetches the tokenizer the workers now serve, when it is not this one; True when it changed."""
        if pools.route() is not None:
            return False
        source = self._worker_to_read(pools)
        if source is None:
            return False
        try:
            files = await _fetch(source, timeout)
            digest = tokenizer_digest(files)
            if source.info.tokenizer_digest and digest != source.info.tokenizer_digest:
                raise ValueError(f"the files differ from the digest the worker reports ({digest[:12]} against "
                                 f"{source.info.tokenizer_digest[:12]}); was the model changed under it?")
            tokenizer = await asyncio.to_thread(Tokenizer.from_files, files)
        except (grpc.aio.AioRpcError, ValueError, UnicodeDecodeError) as e:
            details = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
            error = f"reading it from worker {source.address} failed: {details}"
            if error != self.error:   # retried every poll: said once
                log.warning("%s", error)
            self.error = error
            return False
        self.max_model_len = _max_position_embeddings(files) or source.info.max_model_len or None
        log.info("tokenizer %s read from worker %s%s", digest[:12], source.address,
                 f" (replacing {self.digest[:12]})" if self.digest else "")
        self.tokenizer, self.digest = tokenizer, digest
        return True

    def _worker_to_read(self, pools: Pools) -> WorkerState | None:
        """A ready worker whose tokenizer makes a route (preferred), else any, while there is no tokenizer."""
        ready = sorted((w for pool in pools.pools.values() for w in pool.workers.values() if w.ready),
                       key=lambda w: not w.info.tokenizer_digest)   # those that name their tokenizer first
        for digest in dict.fromkeys(w.info.tokenizer_digest for w in ready if w.info.tokenizer_digest):
            if digest != self.digest and _makes_route(pools, digest):
                return next(w for w in ready if w.info.tokenizer_digest == digest)
        return ready[0] if ready and self.tokenizer is None else None


def _makes_route(pools: Pools, digest: str) -> bool:
    def serves(pool: str) -> bool:
        return any(w.ready and w.info.tokenizer_digest in (digest, "") for w in pools[pool].workers.values())
    return any(all(serves(p) for p in members) for members in ROUTE_POOLS.values())


async def _fetch(worker: WorkerState, timeout: float) -> dict[str, bytes]:
    parts: dict[str, list[bytes]] = {}
    async for chunk in worker.worker.TokenizerFiles(pb.TokenizerFilesRequest(), timeout=timeout,
                                                 metadata=worker.metadata):
        parts.setdefault(chunk.name, []).append(chunk.data)
    return {name: b"".join(data) for name, data in parts.items()}


def _max_position_embeddings(files: dict[str, bytes]) -> int | None:
    try:
        return int(json.loads(files["config.json"])["max_position_embeddings"])
    except (KeyError, TypeError, ValueError):
        return None
