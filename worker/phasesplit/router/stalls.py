"""Stall watching: a stream whose output has started must send its next event within a timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


class Stalled(Exception):
    """No event came within the timeout, and waiting on was declined."""


async def watch_stalls(events: AsyncIterator[T], timeout: float, started: bool,
                       wait_on: Callable[[float], bool]) -> AsyncIterator[T]:
    """Yields `events` until they end. Once started (at once, or from the first event), an event must come
    within `timeout` seconds; when none does, `wait_on(quiet_since)` decides between waiting another
    `timeout` and raising `Stalled`."""
    quiet_since = time.monotonic()
    next_event: asyncio.Future | None = None   # kept across a stall we wait out: cancelling it ends the stream
    try:
        while True:
            next_event = next_event or asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait([next_event], timeout=timeout if started else None)
            if not done:
                if not wait_on(quiet_since):
                    raise Stalled()
                quiet_since = time.monotonic()
                continue
            arrived, next_event = next_event, None
            try:
                event = arrived.result()
            except StopAsyncIteration:
                return
            quiet_since, started = time.monotonic(), True
            yield event
    finally:
        if next_event is not None:
            next_event.cancel()
