"""The start-up ramp: how many connection attempts a fleet process has in flight.

Every connection attempt of every device (the first ones at start-up, and reconnects)
takes a slot from the fleet's :class:`Ramp` before it opens its socket, and gives it back
once the device is up (CONNACK, subscriptions, birth acknowledged) or the attempt failed.
At most ``window`` slots are out at once; waiting devices queue in order. The window
adapts as TCP's congestion window does (additive increase, multiplicative decrease):

* it grows by one per attempt that got its CONNACK in good time (doubling per round
  until the first back-off, then by about one per window's worth of connections);
* it stops growing for ``hold`` seconds when the event loop runs late (a lag sample
  above ``lag_limit``: this process is busy with what it already carries);
* it halves (at most once per ``hold`` seconds, never below ``floor``) when

  - a CONNACK took longer than ``max(latency_floor, 4 x`` the fastest of the last
    ``base_samples`` CONNACKs``)`` (the broker, the path to it or this process is
    queueing: attempts are on their way to the connect timeout, 10 s), or
  - an attempt failed (refused, timed out).

Loop lag alone does not halve the window: a process saturated by its connected devices
runs a second or two late and still carries them (measured at 10,000 devices on two
loaded cores); halving on lag there stalled the ramp at the floor with devices
waiting. The fastest recent CONNACK is the baseline, so a far broker with a steady
round trip is not mistaken for a congested one: once its CONNACKs are all slow, the
baseline follows and the window grows again. ``connect_rate`` in the profile stays an
upper bound on top (devices do not try before their scheduled start).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Ramp"]


class Ramp:
    """Admission of connection attempts, at most ``window`` in flight (see the module)."""

    def __init__(
        self,
        *,
        initial: int = 32,
        floor: int = 2,
        ceiling: int = 1024,
        lag_limit: float = 0.1,
        latency_floor: float = 2.0,
        base_samples: int = 64,
        hold: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= floor <= initial <= ceiling:
            raise ValueError("expected 1 <= floor <= initial <= ceiling")
        self.window = float(initial)
        self.floor = floor
        self.ceiling = ceiling
        self.lag_limit = lag_limit
        self.latency_floor = latency_floor
        self.hold = hold
        self._clock = clock
        self._threshold = float(ceiling)  # slow start below it, additive increase above
        self._recent: deque[float] = deque(maxlen=base_samples)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._last_cut = -1e18
        self._no_growth_until = -1e18
        self.inflight = 0
        # what it did, for stats and tests
        self.backoffs: dict[str, int] = {"latency": 0, "failure": 0}
        self.lag_holds = 0  # times a late loop stopped the window's growth
        self.min_window = self.window
        self.max_inflight = 0

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> None:
        """Wait for a slot (in order of arrival)."""
        if self.inflight < int(self.window) and not self._waiters:
            self._take()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            raise

    def release(self) -> None:
        """Give a slot back (the attempt is over, whatever its outcome)."""
        self.inflight -= 1
        self._admit()

    def connack(self, latency: float) -> None:
        """An attempt got its CONNACK ``latency`` seconds after it started."""
        self._recent.append(latency)
        if latency > max(self.latency_floor, 4 * min(self._recent)):
            self._cut("latency")
            return
        if self._clock() >= self._no_growth_until:
            w = self.window
            self.window = min(float(self.ceiling), w + (1.0 if w < self._threshold else 1.0 / w))
        self._admit()

    def failed(self) -> None:
        """An attempt got no CONNACK (refused, reset, timed out)."""
        self._cut("failure")

    def lag(self, seconds: float) -> None:
        """A sample of the event loop's lag (the fleet's lag monitor): above the limit,
        the window stops growing for ``hold`` seconds."""
        if seconds > self.lag_limit:
            self._no_growth_until = self._clock() + self.hold
            self.lag_holds += 1

    def _cut(self, why: str) -> None:
        now = self._clock()
        if now - self._last_cut < self.hold:
            return
        self._last_cut = now
        self.backoffs[why] += 1
        self._threshold = max(float(self.floor), self.window / 2)
        self.window = self._threshold
        self.min_window = min(self.min_window, self.window)

    def _take(self) -> None:
        self.inflight += 1
        if self.inflight > self.max_inflight:
            self.max_inflight = self.inflight

    def _admit(self) -> None:
        waiters = self._waiters
        while waiters and self.inflight < int(self.window):
            fut = waiters.popleft()
            if fut.done():  # cancelled while waiting
                continue
            self._take()
            fut.set_result(None)

    def stats(self) -> dict[str, object]:
        return {
            "window": round(self.window, 1),
            "inflight": self.inflight,
            "waiting": self.waiting,
            "backoffs": dict(self.backoffs),
        }
