"""One ``edgeferry sim run`` over several processes (``--procs N``).

One core carries a few thousand devices at one message per second; past that the
parent forks ``N`` children, each running a :class:`~firmware_sim.fleet.Fleet` share
(devices ``k, k+N, k+2N, ...``: names, seeds, fault plan and start offsets are those of
the whole fleet). Each child sends its live counters up a pipe every second and its
manifest part at the end; the parent prints the summed ``stats`` lines and a progress
line, forwards Ctrl-C / SIGTERM, and writes one manifest merged from the parts, so
``sim verify`` reads it as it reads a single process's.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from edge.mqtt import BrokerURL
from firmware_sim.errors import SimError
from firmware_sim.fleet import Fleet
from firmware_sim.manifest import build_manifest
from firmware_sim.profile import Profile

__all__ = ["run_split", "merge_manifests"]


def merge_manifests(parts: list[dict[str, Any]], profile: Profile, broker: str) -> dict[str, Any]:
    """One manifest from the manifests of a split run's shares (same run id)."""
    records: dict[str, dict[str, Any]] = {}
    faults: dict[str, int] = {}
    for m in parts:
        records.update(m["devices"])
        for k, v in m["faults_fired"].items():
            faults[k] = faults.get(k, 0) + v
    names = profile.device_names()
    order = {n: i for i, n in enumerate(names)}
    records = dict(sorted(records.items(), key=lambda kv: order.get(kv[0], len(order))))
    durations = [m["duration_s"] for m in parts if m["duration_s"] is not None]
    started = min(m["_wall_start"] for m in parts)
    return build_manifest(
        records,
        run=parts[0]["run"],
        profile=profile,
        broker=broker,
        wall_start=started,
        duration_s=max(durations) if len(durations) == len(parts) else None,
        complete=all(m["complete"] for m in parts),
        faults_fired=faults,
    )


def _child(
    conn: Connection,
    url: str | BrokerURL,
    profile: Profile,
    run_id: str,
    share: tuple[int, int],
    drain_timeout: float,
) -> None:
    """A share of the fleet in a forked child: stats up the pipe each second, then the
    manifest part (or one error line)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM

    async def main() -> None:
        fleet = Fleet(url, profile, run=run_id, drain_timeout=drain_timeout, share=share)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, fleet.stop)

        async def report() -> None:
            n = 1
            while True:
                await asyncio.sleep(max(0.0, fleet.started_at + n * 1.0 - loop.time()))
                conn.send(("stats", n, fleet.stats(reset_lag=True)))
                n += 1

        async with fleet:
            reporter = asyncio.ensure_future(report())
            try:
                await fleet.run()
            finally:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
        m = fleet.manifest()
        m["_wall_start"] = fleet.ctx.wall_start
        conn.send(("manifest", 0, m))

    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - not on Linux
            asyncio.run(main())
        else:
            uvloop.run(main())
    except Exception as e:  # noqa: BLE001 - one line to the parent, which fails the run
        conn.send(("error", share[0], f"{type(e).__name__}: {e}"))
        conn.close()
        os._exit(1)
    conn.close()
    os._exit(0)


def _sum_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    faults: dict[str, int] = {}
    for s in parts:
        for k in ("devices", "connected", "generated", "acked", "dropped", "held", "boots",
                  "waiting", "connecting", "backoffs"):
            out[k] = out.get(k, 0) + s.get(k, 0)
        for k, v in s["faults"].items():
            faults[k] = faults.get(k, 0) + v
    out["faults"] = faults
    out["max_lag_ms"] = max(s["max_lag_ms"] for s in parts)
    return out


def run_split(
    url: str | BrokerURL,
    profile: Profile,
    procs: int,
    *,
    run_id: str,
    broker_str: str,
    drain_timeout: float,
    progress: bool,
    stats_every: float | None,
) -> tuple[dict[str, Any], float]:
    """Run ``profile`` over ``procs`` child processes; return the merged manifest and the
    wall-clock seconds the run took."""
    if profile.chaos is not None:
        raise SimError("--chaos runs one proxy per fleet: use it without --procs")
    ctx = multiprocessing.get_context("fork")
    children = []
    conns: dict[Connection, int] = {}
    for k in range(procs):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_child,
            args=(child_end, url, profile, run_id, (k, procs), drain_timeout),
            name=f"edgeferry-sim-{k}",
            daemon=False,
        )
        p.start()
        child_end.close()
        children.append(p)
        conns[parent_end] = k

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    t_start = time.monotonic()
    ticks: dict[int, dict[int, dict[str, Any]]] = {}
    parts: list[dict[str, Any]] = []
    errors: list[str] = []
    every = max(1, round(stats_every)) if stats_every else None
    try:
        open_conns = set(conns)
        while open_conns:
            for c in wait(list(open_conns)):
                assert isinstance(c, Connection)
                try:
                    kind, n, body = c.recv()
                except EOFError:
                    open_conns.discard(c)
                    continue
                if kind == "stats":
                    got = ticks.setdefault(n, {})
                    got[conns[c]] = body
                    if len(got) == procs:
                        st = _sum_stats(list(ticks.pop(n).values()))
                        if every and n % every == 0:
                            st["t"] = float(n)
                            st["procs"] = procs
                            print("stats " + json.dumps(st, separators=(",", ":")),
                                  file=sys.stderr, flush=True)
                        if progress and n % 5 == 0:
                            print(
                                f"{n} s · connected {st['connected']}/{st['devices']} · "
                                f"acked {st['acked']:,} · held {st['held']:,} · "
                                f"dropped {st['dropped']:,} · {procs} processes",
                                file=sys.stderr,
                                flush=True,
                            )
                elif kind == "manifest":
                    parts.append(body)
                else:
                    errors.append(str(body))
                    forward(signal.SIGTERM, None)
        for child in children:
            child.join()
    finally:
        for signum, h in old.items():
            signal.signal(signum, h)
    elapsed = time.monotonic() - t_start
    if errors:
        raise SimError("fleet process failed: " + "; ".join(errors))
    if len(parts) != procs:
        codes = [child.exitcode for child in children]
        raise SimError(f"{procs - len(parts)} of {procs} fleet processes died (exit codes {codes})")
    return merge_manifests(parts, profile, broker_str), elapsed
