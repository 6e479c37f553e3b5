"""A fleet of simulated devices in one process, one MQTT connection each.

::

    async with Fleet("mqtt://127.0.0.1:18830", profile) as fleet:
        await fleet.wait_connected(timeout=30)
        await fleet.run()                      # profile.duration, or until fleet.stop()
    fleet.manifest()                           # ground truth (written by --manifest)

Leaving the context stops every device's ticks, gives the outboxes ``drain_timeout``
seconds to empty, counts what is left as dropped (reason ``shutdown``), publishes
``offline`` for every device and disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from edge._lifecycle import Lifespan, first_error
from edge._tls import TLSOptions
from edge.mqtt import BrokerURL, parse_url
from firmware_sim._rng import mix
from firmware_sim.context import DeviceContext
from firmware_sim.device import Device
from firmware_sim.errors import ResourceLimitError
from firmware_sim.faults import NO_FAULTS, plan_faults
from firmware_sim.manifest import build_manifest
from firmware_sim.profile import Profile
from firmware_sim.ramp import Ramp

__all__ = ["Fleet", "raise_open_file_limit"]

log = logging.getLogger("edgeferry.sim")


def raise_open_file_limit(needed: int) -> int:
    """Raise the soft open-file limit to at least ``needed``; return the new soft limit.
    Raises :class:`ResourceLimitError` with one clear line when the hard limit is lower."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ResourceLimitError(
                f"one connection per device needs about {needed} open files, but this process "
                f"may open at most {hard} (hard limit): raise it (ulimit -Hn as root, or "
                f"LimitNOFILE= in a systemd unit) or simulate fewer devices"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return needed
    return soft


class Fleet:
    """Simulated devices sharing one event loop. ``url`` is the broker (or a chaos proxy
    in front of it); ``run`` names this run in every payload (``simrun``) and manifest."""

    def __init__(
        self,
        url: str | BrokerURL,
        profile: Profile,
        *,
        run: str | None = None,
        client_prefix: str = "",
        drain_timeout: float = 10.0,
        share: tuple[int, int] | None = None,
    ) -> None:
        self.url = url if isinstance(url, BrokerURL) else parse_url(url)
        self.broker_url = url if isinstance(url, str) else str(url)  # (str(): no password)
        self.profile = profile
        self.run_id = run or f"{profile.site}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.client_prefix = client_prefix
        self.drain_timeout = drain_timeout
        if share is not None and not (share[1] >= 1 and 0 <= share[0] < share[1]):
            raise ValueError(f"share {share!r}: expected (k, n) with 0 <= k < n")
        # (k, n): this Fleet runs devices k, k+n, k+2n, ... of the profile (one process of
        # a split run); names, fault plan and start offsets are those of the whole fleet
        self.share = share
        self.plan = plan_faults(profile)
        self.devices: list[Device] = []
        self.by_name: dict[str, Device] = {}
        # what the devices share with the fleet: settings, clock, live counters, stop state
        self.ctx = DeviceContext(
            profile=profile,
            run_id=self.run_id,
            url=self.url,
            client_prefix=client_prefix,
            rng=random.Random(mix(profile.seed)),
            spawn=self._spawn,
            emptied=self._device_emptied,
        )
        self.counters = self.ctx.counters  # the progress line reads them
        self.max_lag = 0.0  # seconds; the largest event-loop delay since stats(reset_lag=True)
        self.started_at = 0.0
        self.ended_at: float | None = None
        self.chaos: Any = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()  # run() returns
        self._leave = asyncio.Event()  # the async with block ends: drain and stop
        self._lifespan: Lifespan | None = None
        self._undrained: set[str] = set()
        self._drained = asyncio.Event()
        self._entered = False
        self._manifest: dict[str, Any] | None = None

    @property
    def stopping(self) -> bool:
        return self.ctx.stopping

    @property
    def connected(self) -> int:
        """Devices online now."""
        return self.counters.connected

    @property
    def acked(self) -> int:
        """Messages the broker acknowledged."""
        return self.counters.acked

    @property
    def ramp(self) -> Ramp:
        """The start-up ramp: connection attempts in flight (firmware_sim/ramp.py)."""
        return self.ctx.ramp

    @property
    def faults_fired(self) -> dict[str, int]:
        return self.counters.faults_fired

    @property
    def connection_changed(self) -> asyncio.Event:
        """Set whenever a device goes on- or offline."""
        return self.ctx.connection_changed

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Fleet:
        """Start the devices; return once they all run (connecting is theirs to do). A
        device task that fails cancels the ``async with`` block and comes out of it as
        itself."""
        if self._entered:
            raise RuntimeError("a Fleet runs once; make a new one")
        self._entered = True
        p = self.profile
        n = p.devices if self.share is None else -(-p.devices // self.share[1])
        raise_open_file_limit(n * (3 if p.chaos else 1) + 256)
        self._lifespan = Lifespan(self._main, f"fleet {self.run_id}")
        await self._lifespan.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        """Drain the outboxes (``drain_timeout``), go offline, disconnect."""
        self._leave.set()
        if self._lifespan is not None:
            await self._lifespan.__aexit__(et, exc, tb)

    async def _main(self, ready: asyncio.Event) -> None:
        """The fleet's life: its devices' tasks in one task group, until leaving."""
        p = self.profile
        error = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                if p.chaos is not None:
                    await self._start_chaos(stack)
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    self.started_at = t0 = asyncio.get_running_loop().time()
                    self.ctx.wall_start = time.time()
                    for i, name in enumerate(p.device_names()):
                        if self.share is not None and i % self.share[1] != self.share[0]:
                            continue
                        d = Device(self.ctx, i, name, self.plan.get(name, NO_FAULTS))
                        self.devices.append(d)
                        self.by_name[name] = d
                    for d in self.devices:
                        d.start(t0)
                        self._tasks.append(
                            tg.create_task(d.run(t0 + d.index / p.connect_rate), name=d.name)
                        )
                    self._tasks.append(tg.create_task(self._lag_monitor(), name="lag-monitor"))
                    log.info(
                        "fleet %s: %d devices, %g s interval, seed %d, broker %s",
                        self.run_id,
                        p.devices,
                        p.interval,
                        p.seed,
                        self.url,
                    )
                    ready.set()
                    await self._leave.wait()
                    await self._shutdown()
                    for t in self._tasks:
                        t.cancel()
        except BaseExceptionGroup as eg:
            error = first_error(eg)
        finally:
            self._tg = None
        if error is not None:
            raise error  # as itself, with its own context (see first_error)

    async def _start_chaos(self, stack: contextlib.AsyncExitStack) -> None:
        """Put a chaos proxy between every device and the broker (site-wide outages)."""
        from firmware_sim.chaos import ChaosProxy

        spec = self.profile.chaos
        assert spec is not None
        proxy = ChaosProxy(
            self.url.host,
            self.url.port,
            seed=self.profile.seed,
            on_change=lambda what: log.info("fleet link: %s", what),
        )
        self.chaos = await stack.enter_async_context(proxy)
        tls = self.url.tls_options
        if self.url.tls:  # the broker's certificate names the broker, not the proxy
            tls = replace(tls or TLSOptions(), server_name=(tls and tls.server_name) or self.url.host)
        self.url = self.ctx.url = replace(self.url, host="127.0.0.1", port=proxy.port, tls_options=tls)
        schedule = spec.schedule()
        if schedule is not None:
            await proxy.flap(schedule[0], schedule[1], mode=spec.mode)

    async def _shutdown(self) -> None:
        if self.ctx.stopping:
            return
        self.ctx.stopping = True
        self.ended_at = asyncio.get_running_loop().time()
        for d in self.devices:
            d.stop_ticks()
        if self.chaos is not None and self.chaos.flapping:
            await self.chaos.up()  # the outage ends: let the devices drain
        self._undrained = {d.name for d in self.devices if len(d.outbox) and d.alive}
        if not self._undrained:
            self._drained.set()
        for d in self.devices:
            d.wake.set()
        if self._undrained:
            try:
                async with asyncio.timeout(self.drain_timeout):
                    await self._drained.wait()
            except TimeoutError:
                log.warning(
                    "fleet: %d devices still held messages after %g s; counted as "
                    "dropped (shutdown)",
                    len(self._undrained),
                    self.drain_timeout,
                )
        self.ctx.drain_over = True
        for d in self.devices:
            d.outbox.clear("shutdown")
            d.wake.set()
        await asyncio.gather(*(d.shutdown() for d in self.devices), return_exceptions=True)
        self._manifest = self._build_manifest()

    async def _lag_monitor(self) -> None:
        """How late the event loop runs timers: the fleet's own health (is one process
        keeping up with this many devices?), and a signal for the start-up ramp."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.1)
            lag = loop.time() - t - 0.1
            self.ctx.ramp.lag(lag)
            if lag > self.max_lag:
                self.max_lag = lag

    def _device_emptied(self, name: str) -> None:
        """A device's outbox is empty (called while stopping)."""
        if self.ctx.stopping and name in self._undrained:
            self._undrained.discard(name)
            if not self._undrained:
                self._drained.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a short-lived device job (a reboot, an update) in the fleet's task group."""
        if self._tg is None:
            coro.close()
            return
        self._tg.create_task(coro, name=name)

    # ------------------------------------------------------------------ running

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler)."""
        self._stop.set()

    async def run(self, duration: float | None = None) -> None:
        """Run for ``duration`` seconds (default: the profile's; None: until stop())."""
        duration = self.profile.duration if duration is None else duration
        if duration is None:
            await self._stop.wait()
            return
        remaining = self.started_at + duration - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                await self._stop.wait()
        except TimeoutError:
            pass

    async def wait_connected(self, n: int | None = None, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Wait until ``n`` devices (default: all) are online; TimeoutError otherwise."""
        want = len(self.devices) if n is None else n
        try:
            async with asyncio.timeout(timeout):
                while self.connected < want:
                    self.connection_changed.clear()
                    await self.connection_changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"only {self.connected} of {want} devices connected in {timeout:g} s"
            ) from None

    def device(self, name: str) -> Device:
        return self.by_name[name]

    def stats(self, reset_lag: bool = False) -> dict[str, Any]:
        """Live counters: devices online, messages generated / acknowledged / dropped /
        held in outboxes, reboots, faults fired, and the worst event-loop lag (ms)."""
        dropped = sum(d.outbox.dropped for d in self.devices)
        c = self.counters
        out = {
            "devices": len(self.devices),
            "connected": c.connected,
            "generated": c.generated,
            "acked": c.acked,
            "dropped": dropped,
            "held": sum(len(d.outbox) for d in self.devices),
            "boots": c.boots,
            "faults": dict(c.faults_fired),
            "max_lag_ms": round(self.max_lag * 1000, 1),
            # the start-up ramp: devices waiting for their turn, attempts in flight, back-offs
            "waiting": self.ctx.ramp.waiting,
            "connecting": self.ctx.ramp.inflight,
            "backoffs": sum(self.ctx.ramp.backoffs.values()),  # the window halved
        }
        if reset_lag:
            self.max_lag = 0.0
        return out

    # ------------------------------------------------------------------ manifest

    def manifest(self) -> dict[str, Any]:
        """The ground truth of this run (complete once the fleet has stopped)."""
        return self._manifest if self._manifest is not None else self._build_manifest()

    def _build_manifest(self) -> dict[str, Any]:
        ended = self.ended_at
        return build_manifest(
            {d.name: d.record() for d in self.devices},
            run=self.run_id,
            profile=self.profile,
            broker=self.broker_url,
            wall_start=self.ctx.wall_start,
            duration_s=None if ended is None else ended - self.started_at,
            complete=self.ctx.stopping,
            faults_fired=self.counters.faults_fired,
        )
