"""Polling until something holds: the one way tests wait for another thread or process."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float, interval: float = 0.1) -> T:
    """Calls read() until done(value) or the timeout; returns the last value (for the test to assert on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_for(check: Callable[[], T], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> T:
    """Polls check() until it returns something truthy; returns it. TimeoutError names `what`."""
    result = poll(check, bool, timeout, interval)
    if not result:
        raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
    return result


async def eventually(check: Callable[[], T | Awaitable[T]], timeout: float = 5.0, interval: float = 0.05,
                     what: str = "condition") -> T:
    """wait_for inside an event loop: the loop keeps running while it waits; `check` may be a coroutine function."""
    async def checked():
        result = check()
        return await result if inspect.isawaitable(result) else result
    deadline = time.monotonic() + timeout
    while not (result := await checked()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
    return result
