"""Capped, jittered exponential backoff, and the reconnect loop built on it."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from edge.errors import ConnectError
from edge.mqtt import MQTTClient

__all__ = ["Backoff", "connect_retrying", "sleep_unless"]


class Backoff:
    """``next()`` returns the delay before the next attempt: uniformly random between half
    and all of ``min(cap, initial * 2**attempt)`` ("equal jitter"), so a fleet that lost
    its link at the same moment does not reconnect in lockstep. ``reset()`` after success."""

    def __init__(self, initial: float = 0.2, cap: float = 5.0, rng: random.Random | None = None):
        if initial <= 0 or cap < initial:
            raise ValueError("backoff needs 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def reset(self) -> None:
        self.attempt = 0


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep for ``seconds`` or until ``stop`` is set, whichever comes first."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass


async def connect_retrying(
    make: Callable[[], MQTTClient], backoff: Backoff, stop: asyncio.Event, what: str,
    log: logging.Logger, on_error: Callable[[ConnectError], None] | None = None,
) -> MQTTClient | None:
    """Connect a fresh client from ``make()``, retrying with ``backoff`` (logged as
    ``<what>: <error>; retrying in N s``) until it connects (then the backoff is reset
    and the client returned) or ``stop`` is set (then None). ``on_error`` sees each
    failed attempt (the gateway shows it as the link's state)."""
    while not stop.is_set():
        client = make()
        try:
            await client.connect()
        except ConnectError as e:
            if on_error is not None:
                on_error(e)
            delay = backoff.next()
            log.warning("%s: %s; retrying in %.1f s", what, e, delay)
            await sleep_unless(stop, delay)
            continue
        backoff.reset()
        return client
    return None
