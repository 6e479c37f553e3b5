"""Capped, fully jittered exponential backoff, and the reconnect loop built on it.

One :class:`Backoff` lives as long as the thing that reconnects (a service's session, the
gateway's cloud link): it is *not* made afresh per attempt or per drop. After a drop the
caller sleeps :meth:`Backoff.next` before connecting again, and the delays keep growing
across failed connects and across connections that did not last. Only a connection that
stayed up for ``stable`` seconds (default: 10 s, or twice the cap if that is longer)
starts the next outage from the first, short delay again. So two processes that use one
client id, and knock each other off the broker with every connect, slow down to about one
connect per ``cap / 2`` seconds each instead of reconnecting at round-trip speed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from edge.errors import ConnectError
from edge.mqtt import MQTTClient

__all__ = ["Backoff", "connect_retrying", "sleep_unless"]


class Backoff:
    """``next()`` returns the delay before the next attempt, uniformly random between 0 and
    ``min(cap, initial * 2**attempt)`` ("full jitter"), so a fleet that lost its link at the
    same moment does not reconnect in lockstep.

    Call :meth:`connected` when a connection is up. The next call of :meth:`next` (after
    that connection dropped) starts over from ``attempt`` 0 only if the connection had
    stayed up for at least ``stable`` seconds; otherwise the delays keep growing.
    :meth:`reset` starts over at once.
    """

    def __init__(self, initial: float = 0.2, cap: float = 5.0, rng: random.Random | None = None,
                 *, stable: float | None = None, clock: Callable[[], float] = time.monotonic):
        if initial <= 0 or cap < initial:
            raise ValueError("backoff needs 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.stable = max(10.0, 2 * cap) if stable is None else stable
        self.attempt = 0
        self._rng = rng or random.Random()
        self._clock = clock
        self._up_since: float | None = None

    def ceiling(self) -> float:
        """The largest delay :meth:`next` may return now."""
        return min(self.cap, self.initial * (2 ** min(self.attempt, 30)))

    def next(self) -> float:
        if self._up_since is not None:
            if self._clock() - self._up_since >= self.stable:
                self.attempt = 0
            self._up_since = None
        ceiling = self.ceiling()
        self.attempt += 1
        return self._rng.random() * ceiling

    def connected(self) -> None:
        """A connection is up: if it stays up ``stable`` seconds, the backoff starts over."""
        self._up_since = self._clock()

    def reset(self) -> None:
        self.attempt = 0
        self._up_since = None


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
    ``<what>: <error>; retrying in N s``) until it connects (then ``backoff.connected()``
    is called and the client returned) or ``stop`` is set (then None). ``on_error`` sees
    each failed attempt (the gateway shows it as the link's state).

    The first attempt is made at once: after a drop, the caller sleeps ``backoff.next()``
    before calling this again, with the same ``backoff``."""
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
        backoff.connected()
        return client
    return None
