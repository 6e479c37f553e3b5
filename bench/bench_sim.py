"""How large a simulated fleet one process sustains at one message per second per device.

For each fleet size, a fresh Mosquitto (deploy/mosquitto/edge.conf, free port, started
as the tests start it) and one
``edgeferry sim run`` process (``--sensors temperature --interval 1``: one QoS 1 message
per device per second, each device on its own connection). The fleet prints a ``stats``
line every second; after a warm-up the bench measures, over the steady window:

* achieved rate (messages acknowledged by the broker per second) against the target;
* peak RSS (VmHWM) and CPU (% of one core) of the fleet process, and Mosquitto's CPU;
* the worst event-loop lag and the most messages held in outboxes.

The steady window starts 2 s after every device is connected and the start-up backlog
is gone (the fleet's start-up ramp takes 1,000 connections a second at most). A size is *sustained* when the
window covers at least half the run, every device stayed connected, the rate is within 2% of the
target, outboxes held less than one interval's worth of messages and the loop lag stayed
under 0.5 s. The same is measured for a bare loop of the same MQTT client (one task per
connection publishing a fixed payload), the cheapest thing that puts the same load on
the broker, so the report shows what the simulator's realism costs.

``sim run`` splits a fleet over processes by itself (``--procs auto``); the figures (CPU,
RSS) are those of the whole process tree. Every size also reports CPU per 1,000 devices,
RSS per device, the highest 1-minute load average of the window, the fewest devices
connected in the window, how long the ramp took, and from the manifest the readings
sent, acknowledged and dropped. ``--compare ARGS`` runs every size a second time with
other ``sim run`` arguments right after (e.g. ``--compare '--procs 2 --connect-rate 300'``;
``--compare '@REF ARGS'`` runs the code of git ref REF, exported, for an A/B).

    python -m bench.bench_sim [--quick] [--sizes 1000,2000,5000,10000] [--duration 30]
        [--procs N|auto] [--connect-rate R] [--compare ARGS]... [--duration-at N=S]...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from bench._util import PY, REPO, Workdir, cpu_seconds, machine_info, mem_kb, pid_of
from edgeferry.procs import Broker, Proc

TARGET_RSS_MB_AT_1000 = 100
TARGET_SIZE = 5000


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a ``--procs N`` fleet is a parent and N children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _tree_figures(pid: int) -> tuple[int, int, float]:
    """RSS (kB), summed peak RSS (kB) and CPU seconds of ``pid`` and its descendants."""
    rss = hwm = 0
    cpu = 0.0
    for p in _tree(pid):
        try:
            m = mem_kb(p)
            rss += m.get("VmRSS", 0)
            hwm += m.get("VmHWM", 0)
            cpu += cpu_seconds(p)
        except (OSError, ValueError):
            continue
    return rss, hwm, cpu


def _stats_lines(proc: Proc) -> list[dict[str, Any]]:
    out = []
    for line in proc.log_text().splitlines():
        if line.startswith("stats {"):
            try:
                out.append(json.loads(line[6:]))
            except ValueError:
                pass
    return out


def _measure(
    wd: Workdir,
    label: str,
    argv: list[str],
    devices: int,
    duration: float,
    warmup: float,
    broker: Broker,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one fleet process; sample its /proc figures at each stats line."""
    proc = wd.proc(label, argv, env=env).start()
    samples: list[dict[str, Any]] = []
    seen = 0
    deadline = time.monotonic() + duration + 60
    while proc.running and time.monotonic() < deadline:
        lines = _stats_lines(proc)
        for s in lines[seen:]:
            try:
                s["rss_kb"], s["hwm_kb"], s["cpu_s"] = _tree_figures(proc.pid)
                s["load1"] = os.getloadavg()[0]
                s["broker_cpu_s"] = cpu_seconds(pid_of(broker))
                s["wall"] = time.monotonic()
            except (OSError, ValueError):
                continue
            samples.append(s)
        seen = len(lines)
        if samples and samples[-1]["t"] >= duration - 1.01:
            break
        time.sleep(0.2)  # a bench samples /proc; nothing here synchronises on it
    rc = proc.terminate(60)
    # the steady window starts once every device is connected and the start-up backlog is
    # gone (plus a margin), and never before ``warmup``
    ready = next(
        (s["t"] for s in samples if s["connected"] == devices and s.get("held", 0) < devices / 10),
        None,
    )
    begin = max(warmup, ready + 2.0) if ready is not None else warmup
    steady = [s for s in samples if s["t"] >= begin]
    if len(steady) < 2:
        return {
            "error": f"{label}: too few samples ({len(samples)}); rc {rc}; "
            f"log: {proc.log_text()[-400:]}"
        }
    a, b = steady[0], steady[-1]
    span = b["t"] - a["t"]
    rate = (b["acked"] - a["acked"]) / span
    target = devices / 1.0
    wall = b["wall"] - a["wall"]
    res = {
        "devices": devices,
        "target_msg_s": target,
        "achieved_msg_s": round(rate, 1),
        "rate_error_pct": round(100 * (rate - target) / target, 2),
        "connected_min": min(s["connected"] for s in steady),
        "held_max": max(s.get("held", 0) for s in steady),
        "loop_lag_max_ms": max(s.get("max_lag_ms", 0.0) for s in steady),
        "rss_mb": round(b["rss_kb"] / 1024, 1),
        "peak_rss_mb": round(max(s["hwm_kb"] for s in samples) / 1024, 1),
        "cpu_pct_one_core": round(100 * (b["cpu_s"] - a["cpu_s"]) / wall, 1),
        # per device: CPU in % of one core per 1,000 devices, memory in kB (RSS of every
        # fleet process summed, at the end of the window)
        "cpu_pct_per_1000_devices": round(100_000 * (b["cpu_s"] - a["cpu_s"]) / wall / devices, 2),
        "rss_kb_per_device": round(b["rss_kb"] / devices, 1),
        "load_avg_1min_max": round(max(s["load1"] for s in steady), 2),
        "broker_cpu_pct_one_core": round(100 * (b["broker_cpu_s"] - a["broker_cpu_s"]) / wall, 1),
        "window_s": round(span, 1),
        "ramp_s": ready,
    }
    res["sustained"] = bool(
        span >= duration / 2
        and res["connected_min"] == devices
        and abs(res["rate_error_pct"]) <= 2.0
        and res["held_max"] < devices
        and res["loop_lag_max_ms"] < 500
    )
    return res


def _manifest_totals(path: Any) -> dict[str, Any]:
    """Readings sent, acknowledged and dropped (by reason), from the run's manifest."""
    try:
        with open(path) as f:
            tot = json.load(f)["totals"]
    except (OSError, ValueError, KeyError):
        return {}
    return {
        "sent": tot["sent"],
        "acked": tot["acked"],
        "dropped_by_reason": tot["dropped_by_reason"],
        # readings neither acknowledged by the broker nor counted as dropped by a device
        "unaccounted": tot["sent"] - tot["acked"] - sum(tot["dropped_by_reason"].values()),
    }


def _export(ref: str, wd: Workdir) -> str:
    """The packages of git ref ``ref`` in a directory of ``wd`` (for PYTHONPATH)."""
    dest = wd / ("src-" + ref.replace("/", "_"))
    dest.mkdir()
    tar = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "edge", "gateway", "edgeferry", "firmware_sim"],
        check=True, capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return str(dest)


def _one(
    kind: str,
    devices: int,
    duration: float,
    warmup: float,
    extra: list[str] | None = None,
    ref: str | None = None,
) -> dict[str, Any]:
    """One fleet (``kind`` "sim", with ``extra`` ``sim run`` arguments; the code of git
    ``ref`` when given) or the bare loop. ``--connect-rate R`` goes into a profile file
    (``connect_rate: R``), which older refs without the flag read too."""
    label = " ".join(extra or []) or "defaults"
    extra = list(extra or [])
    wd = Workdir("efbench-sim-")
    try:
        broker = wd.broker("edge", f"edge-{kind}-{devices}").start()
        env = {"PYTHONPATH": _export(ref, wd)} if ref else None
        if "--connect-rate" in extra:
            i = extra.index("--connect-rate")
            (wd / "profile.yaml").write_text(f"connect_rate: {float(extra[i + 1]):g}\n")
            extra[i : i + 2] = ["--profile", str(wd / "profile.yaml")]
        if kind == "sim":
            argv = [
                PY,
                "-m",
                "edgeferry",
                "sim",
                "run",
                "--broker",
                broker.url,
                "--devices",
                str(devices),
                "--interval",
                "1",
                "--duration",
                str(duration),
                "--seed",
                "1",
                "--sensors",
                "temperature",
                "--no-progress",
                "--stats-every",
                "1",
                "--drain-timeout",
                "5",
                "--manifest",
                str(wd / "manifest.json"),
                *extra,
            ]
        else:
            argv = [
                PY,
                "-m",
                "bench.bench_sim",
                "--bare",
                str(devices),
                "--broker",
                broker.url,
                "--duration",
                str(duration),
            ]
        res = _measure(wd, f"{kind}-{devices}", argv, devices, duration, warmup, broker, env)
        if kind == "sim":
            res["config"] = (f"@{ref} " if ref else "") + label
            res["manifest"] = _manifest_totals(wd / "manifest.json")
        return res
    finally:
        wd.cleanup()


def run(
    quick: bool,
    sizes: list[int] | None = None,
    duration: float | None = None,
    procs: str | None = None,
    connect_rate: float | None = None,
    compare: list[str] | None = None,
    durations: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Largest fleet sustained at 1 msg/s per device, RSS at 1,000 devices, achieved rate.
    ``procs`` and ``connect_rate`` are passed to ``sim run`` when given (its defaults
    otherwise); each ``compare`` entry is another set of ``sim run`` arguments, run at
    every size right after the first (the same broker setup, the same machine state).
    ``durations`` overrides the run length per size."""
    limit = _raise_nofile()
    duration = duration or (20.0 if quick else 30.0)
    warmup = 3.0
    sizes = sizes or ([1000, 2000] if quick else [1000, 2000, 5000, 10000])
    base: list[str] = []
    if procs is not None:
        base += ["--procs", procs]
    if connect_rate is not None:
        base += ["--connect-rate", f"{connect_rate:g}"]
    configs: list[tuple[str | None, list[str]]] = [(None, base)]
    for c in compare or []:
        words = c.split()
        if words and words[0].startswith("@"):  # "@REF args": that git ref's code
            configs.append((words[0][1:], words[1:]))
        else:
            configs.append((None, words))
    fleets: list[dict[str, Any]] = []
    for n in sizes:
        if n + 256 > limit:
            fleets.append({"devices": n, "error": f"open-file hard limit {limit} is too low"})
            continue
        d = (durations or {}).get(n, duration)
        for ref, extra in configs:
            fleets.append(_one("sim", n, d, warmup, extra, ref))
    bare = _one("bare", 1000, duration, warmup)
    ok = [f for f in fleets if f.get("sustained") and f.get("config") == (" ".join(base) or "defaults")]
    at_1000 = next((f for f in fleets if f.get("devices") == 1000 and "error" not in f), None)
    res: dict[str, Any] = {
        "command": "python -m bench.bench_sim" + (" --quick" if quick else "")
        + (f" --sizes {','.join(map(str, sizes))}" if sizes else "")
        + (f" --duration {duration:g}" if duration else "")
        + (f" --procs {procs}" if procs is not None else "")
        + (f" --connect-rate {connect_rate:g}" if connect_rate else "")
        + "".join(f" --compare '{c}'" for c in compare or [])
        + "".join(f" --duration-at {n}={v:g}" for n, v in (durations or {}).items()),
        "machine": machine_info(),
        "duration_s": duration,
        "largest_sustained_devices": max((f["devices"] for f in ok), default=0),
        "fleets": fleets,
        "bare_client_loop_1000": bare,
    }
    if at_1000 is not None:
        res["at_1000"] = {
            "peak_rss_mb": at_1000["peak_rss_mb"],
            "achieved_msg_s": at_1000["achieved_msg_s"],
            "rate_error_pct": at_1000["rate_error_pct"],
            "cpu_pct_one_core": at_1000["cpu_pct_one_core"],
            "rss_target_mb": TARGET_RSS_MB_AT_1000,
        }
        if "error" not in bare:
            res["at_1000"]["rss_vs_bare_loop"] = round(
                at_1000["peak_rss_mb"] / bare["peak_rss_mb"], 2
            )
            res["at_1000"]["cpu_vs_bare_loop"] = round(
                at_1000["cpu_pct_one_core"] / max(bare["cpu_pct_one_core"], 0.1), 2
            )
    return res


def summary(res: dict[str, Any]) -> str:
    lines = [
        f"  largest fleet sustained at 1 msg/s per device: {res['largest_sustained_devices']} "
        f"devices (target {TARGET_SIZE})"
    ]
    head = (
        f"  {'devices':>8} {'msg/s':>9} {'err %':>6} {'peak RSS MB':>11} {'CPU %':>6} "
        f"{'broker %':>8} {'lag ms':>7} {'held':>6} {'%/1k dev':>8} {'kB/dev':>6} {'load':>5}"
        f" {'conn min':>8} {'ramp s':>6} {'dropped':>7}  sustained  config"
    )
    lines.append(head)
    rows = [("sim", f) for f in res["fleets"]] + [("bare", res["bare_client_loop_1000"])]
    for kind, f in rows:
        if "error" in f:
            lines.append(f"  {kind} {f.get('devices', '?')}: {f['error']}")
            continue
        lines.append(
            f"  {f['devices']:>8} {f['achieved_msg_s']:>9} {f['rate_error_pct']:>6} "
            f"{f['peak_rss_mb']:>11} {f['cpu_pct_one_core']:>6} "
            f"{f['broker_cpu_pct_one_core']:>8} {f['loop_lag_max_ms']:>7} {f['held_max']:>6} "
            f"{f['cpu_pct_per_1000_devices']:>8} {f['rss_kb_per_device']:>6} "
            f"{f['load_avg_1min_max']:>5} {f['connected_min']:>8} {f['ramp_s'] or '-':>6} "
            f"{sum(f.get('manifest', {}).get('dropped_by_reason', {}).values()):>7}  "
            f"{f['sustained']!s:>9}  "
            + ("(bare client loop)" if kind == "bare" else f.get("config", ""))
        )
    a = res.get("at_1000")
    if a:
        lines.append(
            f"  at 1,000 devices: {a['peak_rss_mb']} MB peak RSS (target < {a['rss_target_mb']}), "
            f"{a['achieved_msg_s']} msg/s ({a['rate_error_pct']:+}%), "
            f"{a.get('rss_vs_bare_loop', '?')}x the RSS and {a.get('cpu_vs_bare_loop', '?')}x "
            f"the CPU of the bare client loop"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the bare client loop


async def _bare(url: str, devices: int, duration: float) -> None:
    import asyncio

    from edge.mqtt import MQTTClient

    payload = b'{"seq":0,"value":21.5,"unit":"C"}'
    acked = 0
    connected = 0

    async def one(i: int, start: float) -> None:
        nonlocal acked, connected
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start + i / 1000 - loop.time()))
        async with MQTTClient(url, f"bare-{i}", keepalive=15, max_inflight=8) as c:
            connected += 1
            n = 0
            first = start + (i % 1000) / 1000
            while True:
                n += 1
                await asyncio.sleep(max(0.0, first + n - loop.time()))
                await c.publish(f"dt/bare-{i}/temperature", payload, 1)
                acked += 1

    async def report(start: float) -> None:
        loop = asyncio.get_running_loop()
        k = 1
        while True:
            await asyncio.sleep(max(0.0, start + k - loop.time()))
            print(
                "stats "
                + json.dumps(
                    {
                        "t": round(loop.time() - start, 3),
                        "acked": acked,
                        "connected": connected,
                        "held": 0,
                        "max_lag_ms": 0.0,
                    }
                ),
                file=sys.stderr,
                flush=True,
            )
            k += 1

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = [asyncio.create_task(one(i, start)) for i in range(devices)]
    tasks.append(asyncio.create_task(report(start)))
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), duration)
    except TimeoutError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", help="comma-separated fleet sizes")
    p.add_argument("--duration", type=float)
    p.add_argument("--procs", help="edgeferry sim run --procs N|auto (default: sim run's, auto)")
    p.add_argument("--connect-rate", type=float, help="sim run --connect-rate (default: sim run's)")
    p.add_argument("--compare", action="append", metavar="ARGS",
                   help="also run every size with these sim run arguments, e.g. "
                   "'--procs 2 --connect-rate 300'; '@REF ARGS' runs git REF's code (repeatable)")
    p.add_argument("--duration-at", action="append", metavar="N=S", default=[],
                   help="run length for one size, e.g. 10000=120 (repeatable)")
    p.add_argument("--bare", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--broker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.bare:
        import uvloop

        url = a.broker or _bare_broker_from_env()
        uvloop.run(_bare(url, a.bare, a.duration or 30.0))
        return 0
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else None
    durations = {int(k): float(v) for k, v in (x.split("=") for x in a.duration_at)}
    res = run(a.quick, sizes, a.duration, a.procs, a.connect_rate, a.compare, durations)
    print(summary(res))
    print(json.dumps(res, indent=1))
    return 0


def _bare_broker_from_env() -> str:
    import os

    url = os.environ.get("EDGEFERRY_BENCH_BROKER")
    if not url:
        raise SystemExit("--bare needs --broker URL")
    return url


if __name__ == "__main__":
    sys.exit(main())
