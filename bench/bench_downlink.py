"""Downlink benchmark (issue 11): commands and desired state from the cloud database to a
site, through real Mosquittos, a real gateway, ingest and an SDK service, in one run.

local Mosquitto <-> gateway <-> chaos proxy <-> cloud Mosquitto <-> ingest (sqlite sink)
        ^-- edgeferry service run bench.svc_cmd:svc (command ``noop``)

* round trip: one command at a time to an online site, from writing it to the cloud
  database and publishing it (what ``cmd send`` does, without the CLI's Python start-up)
  until its ``succeeded`` status with the reply is stored in the cloud database (the
  reply travels up the uplink's events lane); p50 / p99 / max, for the gateway's default
  ``--commit-interval`` (0.2 s: how long a message may wait for its group commit) and
  for 10 ms;
* reconnect: the site's cloud link is cut, N commands are queued, the link comes back;
  the time from the link's return until all N are ``succeeded`` in the cloud database
  (3 runs, the median);
* shadow: the link is cut, the desired state of T things is set (a new version each
  run), the link comes back; the time until a subscriber on the local broker
  (``shadow/+/desired``, what a device subscribes to) holds every thing's new version
  (3 runs, the median).

    .venv/bin/python -m bench --only downlink [--quick]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

__all__ = ["run", "summary"]


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class _Site:
    def __init__(self, wd: Any, commit_interval: str, tag: str) -> None:
        from bench._util import PY
        from firmware_sim.chaos_thread import ThreadedChaosProxy

        self.node = f"bench-{tag}"
        self.edge = wd.broker("edge", f"edge-{tag}").start()
        self.cloud = wd.broker("cloud", f"cloud-{tag}").start()
        self.proxy = ThreadedChaosProxy(self.cloud.host, self.cloud.port).start()
        self.db = wd / f"cloud-{tag}.db"
        self.ingest = wd.proc(f"ingest-{tag}", [PY, "-m", "edgeferry", "ingest", "run", "--cloud", self.cloud.url,
                                                "--sink", f"sqlite:{self.db}", "--client-id", f"ingest-{tag}"]).start()
        self.ingest.wait_for_line("ingest connected", 30)
        self.gateway = wd.proc(f"gateway-{tag}", [
            PY, "-m", "edgeferry", "gateway", "run", "--local", self.edge.url,
            "--cloud", f"mqtt://127.0.0.1:{self.proxy.port}", "--store", str(wd / f"store-{tag}.db"),
            "--node-id", self.node, "--commit-interval", commit_interval, "--backoff-max", "1s"]).start()
        self.gateway.wait_for_line("gateway ready", 30)
        self.target = wd.proc(f"target-{tag}", [
            PY, "-m", "edgeferry", "service", "run", "bench.svc_cmd:svc", "--broker", self.edge.url,
            "--state-dir", str(wd / f"state-{tag}"), "--log-level", "INFO"]).start()
        self.target.wait_for_line("service benchtarget ready", 30)
        self.gateway.wait_for_line(r"cloud broker .* connected", 30)

    def stop(self) -> None:
        self.proxy.stop()
        for p in (self.target, self.gateway, self.ingest):
            if p.running:
                p.terminate(10)
        self.edge.stop()
        self.cloud.stop()


async def _round_trips(site: _Site, n: int) -> list[float]:
    from edge.mqtt import MQTTClient
    from gateway.cloudstate import CloudState
    from gateway.topics import cmd_topic

    st = CloudState(site.db)
    client = MQTTClient(site.cloud.url, "bench-cmd-sender")
    await client.connect()
    out = []
    try:
        for i in range(n + 5):  # the first 5 warm up (first connections, first commits)
            t0 = time.perf_counter()
            cid = st.add_command(site.node, "benchtarget", "noop", {"i": i}, 60.0)
            offer = st.offer(cid)
            assert offer is not None
            wire = {k: offer[k] for k in ("id", "target", "name", "args", "ttl_ms")}
            await client.publish(cmd_topic(site.node, cid), json.dumps(wire).encode(), 1)
            while True:
                row = st.command(cid)
                if row is not None and row["state"] == "succeeded":
                    break
                await asyncio.sleep(0.001)
            if i >= 5:
                out.append(time.perf_counter() - t0)
    finally:
        await client.close()
        st.close()
    return out


def _count_state(db: Any, node: str, state: str) -> int:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT count(*) FROM commands WHERE node=? AND state=?", (node, state)).fetchone()[0])
    finally:
        con.close()


def _reconnect_commands(site: _Site, n: int) -> dict[str, float]:
    from bench._util import wait_until
    from gateway.cloudstate import CloudState

    site.proxy.cut()
    site.gateway.wait_for_line(r"cloud link \(downlink\) lost", 30)
    st = CloudState(site.db)
    try:
        for i in range(n):
            st.add_command(site.node, "benchtarget", "noop", {"i": i}, 3600.0)
    finally:
        st.close()
    before = _count_state(site.db, site.node, "succeeded")
    t0 = time.monotonic()
    site.proxy.up()
    wait_until(lambda: _count_state(site.db, site.node, "succeeded") >= before + n, 300,
               f"{n} commands succeeded")
    return {"commands": n, "seconds_until_all_succeeded": round(time.monotonic() - t0, 3)}


async def _watch_desired(url: str, things: int, version: int, ready: asyncio.Event,
                         done: asyncio.Event) -> None:
    from edge.mqtt import Message, MQTTClient

    have: set[str] = set()

    def on_message(m: Message) -> None:
        try:
            if json.loads(m.payload).get("version") == version:
                have.add(m.topic)
        except ValueError:
            return
        if m.qos:
            client.ack(m.pid)
        if len(have) >= things:
            done.set()

    client = MQTTClient(url, "bench-desired-watch", on_message=on_message, max_inflight=1000)
    await client.connect()
    await client.subscribe([("shadow/+/desired", 1)])
    ready.set()
    try:
        await done.wait()
    finally:
        await client.close()


def _reconnect_desired(site: _Site, things: int, version: int = 1) -> dict[str, float]:
    from gateway.cloudstate import CloudState

    site.proxy.cut()
    site.gateway.wait_for_line(r"cloud link \(downlink\) lost", 30)
    st = CloudState(site.db)
    try:
        for i in range(things):
            st.set_desired(site.node, f"thing-{i:04d}", {"interval": 5, "n": i})
    finally:
        st.close()

    async def main() -> float:
        ready, done = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(_watch_desired(site.edge.url, things, version, ready, done))
        await ready.wait()
        t0 = time.monotonic()
        site.proxy.up()
        async with asyncio.timeout(300):
            await done.wait()
        dt = time.monotonic() - t0
        await task
        return dt

    return {"things": things, "seconds_until_all_held_locally": round(asyncio.run(main()), 3)}


def run(quick: bool) -> dict[str, Any]:
    from bench._util import Workdir, machine_info

    n_rt = 50 if quick else 300
    n_cmds = 200 if quick else 1000
    n_things = 200 if quick else 1000
    wd = Workdir("efbench-downlink-")
    out: dict[str, Any] = {"machine": machine_info()}
    try:
        for tag, ci in (("default", "0.2s"), ("fast", "10ms")):
            site = _Site(wd, ci, tag)
            try:
                rts = asyncio.run(_round_trips(site, n_rt))
                out[f"round_trip_commit_{tag}"] = {
                    "commit_interval": ci, "commands": len(rts),
                    "p50_ms": round(statistics.median(rts) * 1000, 1),
                    "p99_ms": round(_pct(rts, 99) * 1000, 1), "max_ms": round(max(rts) * 1000, 1)}
                if tag == "default":
                    reps = 1 if quick else 3
                    cmds = [_reconnect_commands(site, n_cmds)["seconds_until_all_succeeded"]
                            for _ in range(reps)]
                    out["reconnect_pending_commands"] = {
                        "commands": n_cmds, "runs": cmds,
                        "seconds_until_all_succeeded": statistics.median(cmds)}
                    shadow = [_reconnect_desired(site, n_things, v + 1)["seconds_until_all_held_locally"]
                              for v in range(reps)]
                    out["reconnect_desired_state"] = {
                        "things": n_things, "runs": shadow,
                        "seconds_until_all_held_locally": statistics.median(shadow)}
            finally:
                site.stop()
        out["targets"] = {"round_trip_p99_ms_below": 100}
        out["command"] = "python -m bench --only downlink" + (" --quick" if quick else "")
    finally:
        wd.cleanup()
    return out


def summary(res: dict[str, Any]) -> str:
    lines = []
    for tag in ("default", "fast"):
        r = res.get(f"round_trip_commit_{tag}")
        if r:
            lines.append(f"  round trip (commit interval {r['commit_interval']}): p50 {r['p50_ms']} ms, "
                         f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms over {r['commands']} commands")
    c = res.get("reconnect_pending_commands")
    if c:
        lines.append(f"  reconnect -> {c['commands']} pending commands succeeded: median "
                     f"{c['seconds_until_all_succeeded']} s of {c.get('runs')}")
    d = res.get("reconnect_desired_state")
    if d:
        lines.append(f"  reconnect -> desired state of {d['things']} things held locally: median "
                     f"{d['seconds_until_all_held_locally']} s of {d.get('runs')}")
    return "\n".join(lines)
