"""Run a fleet as a command: preflight, signals, a live progress line, the manifest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from edge.errors import ConnectError
from edge.mqtt import BrokerURL, MQTTClient, parse_url
from firmware_sim.errors import SimError
from firmware_sim.fleet import Fleet, raise_open_file_limit
from firmware_sim.manifest import write_manifest
from firmware_sim.profile import Profile

__all__ = ["run_fleet", "RateMeter", "auto_procs", "DEVICES_PER_PROCESS"]

# devices one process carries at one message per second with room to spare: one core
# sustained 5,000 on a fast day and 2,000 on a slow one (docs/simulator.md, Scale)
DEVICES_PER_PROCESS = 2500


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def auto_procs(profile: Profile, cpus: int | None = None) -> int:
    """``--procs auto``: one process per ``DEVICES_PER_PROCESS`` devices (rounded up),
    at most one per CPU; one when a chaos proxy runs (one proxy per fleet)."""
    if profile.chaos is not None:
        return 1
    cpus = cpu_count() if cpus is None else cpus
    return max(1, min(cpus, -(-profile.devices // DEVICES_PER_PROCESS)))


class RateMeter:
    """Messages per second over a sliding window of samples."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def add(self, t: float, count: int) -> float:
        self.samples.append((t, count))
        while len(self.samples) > 2 and t - self.samples[0][0] > self.window:
            self.samples.pop(0)
        t0, c0 = self.samples[0]
        return (count - c0) / (t - t0) if t > t0 else 0.0


async def _preflight(url: str | BrokerURL) -> None:
    """One connection before the fleet: a wrong URL fails at once, with one line."""
    try:
        async with MQTTClient(
            url, f"edgeferry-sim-preflight-{time.monotonic_ns() % 10**9}", connect_timeout=5
        ):
            pass
    except ConnectError as e:
        raise SimError(f"cannot reach the broker: {e}") from None


async def _main(
    broker: str | BrokerURL,
    profile: Profile,
    manifest_path: Path | None,
    run_id: str | None,
    drain_timeout: float,
    progress: bool,
    stats_every: float | None,
) -> int:
    await _preflight(broker)
    if profile.chaos is not None:
        _quiet_cancelled_callbacks()
    fleet = Fleet(broker, profile, run=run_id, drain_timeout=drain_timeout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, fleet.stop)
    async with fleet:
        reporter = asyncio.ensure_future(_report(fleet, stats_every)) if stats_every else None
        try:
            if progress:
                await _with_progress(fleet, profile.target_rate())
            else:
                await fleet.run()
        finally:
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
    m = fleet.manifest()
    if manifest_path is not None:
        write_manifest(manifest_path, m)
    _print_summary(m, profile, manifest_path, "")
    return 0


def _print_summary(
    m: dict[str, Any], profile: Profile, manifest_path: Path | None, where: str
) -> None:
    target = profile.target_rate()
    tot = m["totals"]
    elapsed = m["duration_s"] or 0.0
    rate = tot["acked"] / elapsed if elapsed else 0.0
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(tot["dropped_by_reason"].items())) or "none"
    print(
        f"run {m['run']}: {profile.devices} devices{where}, {elapsed:.1f} s, "
        f"sent {tot['sent']} readings, "
        f"acked {tot['acked']} messages ({rate:.1f}/s, target {target:.1f}/s), dropped by devices: "
        f"{reasons}" + (f"; manifest {manifest_path}" if manifest_path else ""),
        file=sys.stderr,
    )


def _quiet_cancelled_callbacks() -> None:
    """The chaos proxy's cut cancels its per-connection tasks, which asyncio reports as
    "Exception in callback ... CancelledError" at ERROR level: noise on a user's terminal,
    not a fault. Everything else still goes to the default handler."""
    loop = asyncio.get_running_loop()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if isinstance(context.get("exception"), asyncio.CancelledError):
            return
        lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def _report(fleet: Fleet, every: float) -> None:
    """A JSON line of live counters on stderr every ``every`` seconds (for scripts)."""
    loop = asyncio.get_running_loop()
    n = 1
    while True:
        await asyncio.sleep(max(0.0, fleet.started_at + n * every - loop.time()))
        s = fleet.stats(reset_lag=True)
        s["t"] = round(loop.time() - fleet.started_at, 3)
        print("stats " + json.dumps(s, separators=(",", ":")), file=sys.stderr, flush=True)
        n += 1


async def _with_progress(fleet: Fleet, target: float) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    duration = fleet.profile.duration
    meter = RateMeter()
    cols = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    with Progress(*cols, transient=False, refresh_per_second=4) as bar:
        task = bar.add_task("starting", total=duration)
        runner = asyncio.ensure_future(fleet.run())
        try:
            while not runner.done():
                now = asyncio.get_running_loop().time()
                s = fleet.stats()
                rate = meter.add(now, s["acked"])
                desc = (
                    f"connected {s['connected']}/{s['devices']} · {rate:,.1f} msg/s "
                    f"(target {target:,.1f}) · acked {s['acked']:,} · held {s['held']:,} "
                    f"· dropped {s['dropped']:,}"
                )
                bar.update(
                    task,
                    description=desc,
                    completed=min(now - fleet.started_at, duration) if duration else None,
                )
                await asyncio.wait([runner], timeout=0.5)
        finally:
            if not runner.done():
                runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


def _run_split(
    broker: str | BrokerURL,
    profile: Profile,
    procs: int,
    manifest_path: Path | None,
    run_id: str | None,
    drain_timeout: float,
    progress: bool,
    stats_every: float | None,
) -> int:
    from firmware_sim._split import run_split

    asyncio.run(_preflight(broker))  # before forking: no event loop runs in the parent after
    run_id = run_id or f"{profile.site}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    broker_str = broker if isinstance(broker, str) else str(broker)
    m, _ = run_split(broker, profile, procs, run_id=run_id, broker_str=broker_str,
                     drain_timeout=drain_timeout, progress=progress, stats_every=stats_every)
    if manifest_path is not None:
        write_manifest(manifest_path, m)
    _print_summary(m, profile, manifest_path, f" in {procs} processes")
    return 0


def run_fleet(
    broker: str | BrokerURL,
    profile: Profile,
    *,
    manifest_path: Path | None = None,
    run_id: str | None = None,
    drain_timeout: float = 10.0,
    progress: bool = True,
    stats_every: float | None = None,
    procs: int | None = None,
) -> int:
    """Run the fleet to completion on uvloop (when available); return the exit code.
    ``procs`` > 1 splits the devices over that many child processes (firmware_sim/_split.py)
    and writes one manifest merged from theirs; None picks the number (:func:`auto_procs`)."""
    if isinstance(broker, str):
        parse_url(broker)  # ConfigError with one line if bad
    if procs is None:
        procs = auto_procs(profile)
    if procs < 1:
        raise SimError(f"--procs {procs}: expected at least 1")
    procs = min(procs, profile.devices)
    raise_open_file_limit(-(-profile.devices // procs) * (3 if profile.chaos else 1) + 256)
    if manifest_path is not None:
        parent = Path(manifest_path).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise SimError(
                f"cannot write manifest {manifest_path}: {parent} is not a writable directory"
            )
    if procs > 1:
        return _run_split(broker, profile, procs, manifest_path, run_id, drain_timeout,
                          progress, stats_every)
    main = _main(broker, profile, manifest_path, run_id, drain_timeout, progress, stats_every)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on Linux
        return asyncio.run(main)
    return uvloop.run(main)
