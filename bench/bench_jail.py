"""The edge side on a Pi's CPU: edgeferry against Mosquitto's bridge, jailed in a cgroup.

The edge side of each pipeline runs inside a cgroup (v1) with a CPU quota of a tenth or
a quarter of one core (``cpu.cfs_quota_us`` 10,000 or 25,000 per 100,000 us) and 512 MiB
(``memory.limit_in_bytes``); the cgroup code is bench/bench_pibudget.py's:

    edgeferry: [ edge mosquitto + gateway ]          -> proxy -> cloud mosquitto -> ingest
    bridge:    [ edge mosquitto with its bridge ]    -> proxy -> cloud mosquitto -> bridge_sink

Outside the cgroup: the load generator (``firmware_sim.loadgen``, QoS 1, window 1000,
100-byte payloads, 10 device topics), the proxy, the cloud broker and the sink. Per
quota, both pipelines in the same run, interleaved (the order alternates per round):

- live: 30,000 messages as fast as the jailed broker acknowledges them; delivered/s at
  the sink (first loadgen message to last sink row), lost, duplicated, CPU s per
  100,000 and peak RSS of each jailed process, throttled periods.
- outage: a third of the messages live; then the cloud link is cut and the second third
  sent (what the edge side takes in while offline: the loadgen's rate, CPU per 100,000);
  after ``outage`` s (60; 10 with --quick) the link comes back and the last third is
  sent while the backlog drains: ``up()`` to the last row at the sink, the catch-up rate
  (two thirds over that time), lost and duplicated.

Beside them the load generator's own ceiling: alone against an unjailed broker, and
against a jailed broker nobody subscribes to (the broker's own ceiling in the quota).
And the site's floor, in the live rounds, interleaved with the pipelines:

- ``edgeferry-gateway-outside``: the edgeferry pipeline with only the edge broker in the
  quota and the gateway outside it: what the site could deliver if the gateway cost
  nothing, given Mosquitto serving the gateway's QoS 1 session;
- ``floor1`` / ``floor0``: the jailed broker with ``mosquitto_sub`` outside as the only
  subscriber on ``dt/#`` at QoS 1 / QoS 0 (what a QoS 0 local session would buy).
Needs root and cgroup v1 (skips otherwise). Never part of ``make test``.

    python -m bench --only jail [--quick]
    python -m bench.bench_jail [--quick] [--quotas 10,25] [--rounds N] [--ab GITREF] [--live-only]

``--ab REF`` adds a third pipeline, edgeferry with the gateway (edge, gateway, edgeferry,
firmware_sim) of git ref REF exported beside (PYTHONPATH), interleaved with the others:
the A/B of a change in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from bench._uplink_pipelines import BRIDGE_ID, Bridge, Edgeferry, Pipeline, bridge_lines
from bench._util import (
    PY,
    REPO,
    Loadgen,
    Workdir,
    count_run,
    cpu_seconds,
    machine_info,
    mem_kb,
    run_loadgen,
    wait_line,
    wait_until,
)
from bench.bench_pibudget import MEMORY, PERIOD_US, Cgroup, _available
from edgeferry.procs import EDGE_CONF, Broker

_MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"  # Debian's mosquitto-clients
_MOSQUITTO_SUB_OK = os.access(_MOSQUITTO_SUB, os.X_OK)

NAME = "jail"
__all__ = ["run", "summary"]

QUOTAS = (10, 25)  # % of one core
GW_OUTSIDE = "edgeferry-gateway-outside"  # the site's floor: the edge broker alone in the quota
SIZE = 100


def log(msg: str) -> None:
    print(f"  [jail {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cgroup(wd: Workdir, tag: str, pct: int) -> Cgroup:
    return Cgroup(f"edgeferry-jail-{os.getpid()}-{tag}", wd, PERIOD_US * pct // 100, MEMORY)


def _jailed_edge(p: Pipeline, cg: Cgroup, extra: list[str] | None = None) -> Broker:
    b = Broker(EDGE_CONF, p.wd / "edge", name="edge", binary=str(cg.mosquitto), extra=extra or (),
               die_with_parent=True)
    p.wd._started.append(b)
    return b


class JailedEdgeferry(Edgeferry):
    """Edge mosquitto and gateway in the cgroup; everything else as bench_uplink's."""

    pct = 10
    src: str | None = None  # the gateway's code from another checkout (A/B against a git ref)
    gateway_jailed = True  # False: only the edge broker in the quota (the floor of the site)

    def _start(self, sync: str, extra: tuple[str, ...]) -> None:
        self.cg = _cgroup(self.wd, "ef", self.pct)
        self._start_common()
        self.sync = sync
        self.store = self.wd / "store.db"
        self.edge = _jailed_edge(self, self.cg).start(timeout=30)
        self.ingest = self.wd.proc("ingest", [
            PY, "-m", "edgeferry", "ingest", "run", "--cloud", self.cloud.url,
            "--sink", f"jsonl:{self.sink}", "--client-id", "bench-ingest"]).start()
        wait_line(self.ingest, "ingest ready", 60)
        jail = [str(self.cg.wrapper)] if self.gateway_jailed else []
        self.gateway_argv = [
            *jail, PY, "-m", "edgeferry", "gateway", "run", "--local", self.edge.url,
            "--cloud", self.proxy_url, "--store", str(self.store), "--node-id", "bench",
            "--uplink", "dt/#", "--backoff-max", "1s", "--keepalive", "10s", "--sync", sync, *extra]
        env = {"PYTHONPATH": self.src} if self.src else None
        self.gateway = self.wd.proc("gateway", self.gateway_argv, env=env).start()
        wait_line(self.gateway, "gateway ready", timeout=120)
        self.wait_links(local=True, cloud=True, timeout=60)

    def jailed(self) -> dict[str, int]:
        return {"edge_broker": self.edge.pid or 0, "gateway": self.gateway.pid}

    def close(self) -> None:
        try:
            super().close()
        finally:
            if hasattr(self, "cg"):
                self.cg.remove()


class JailedBridge(Bridge):
    """Edge mosquitto with its bridge in the cgroup."""

    pct = 10

    def _start(self) -> None:
        self.cg = _cgroup(self.wd, "br", self.pct)
        self._start_common()
        self.sinkp = self.wd.proc("bridge_sink", [
            PY, "-m", "bench.bridge_sink", "--cloud", self.cloud.url, "--sink", str(self.sink),
            "--client-id", "bench-bridge-sink", "--filter", "dt/#"]).start()
        wait_line(self.sinkp, "sink ready", 60)
        assert self.proxy is not None
        self.edge = _jailed_edge(self, self.cg, bridge_lines(self.proxy.port))
        mark = self.cloud.mark()
        self.edge.start(timeout=30)
        self.cloud.wait_for_log(f" as {BRIDGE_ID} ", 60, since=mark)

    def jailed(self) -> dict[str, int]:
        return {"edge_broker": self.edge.pid or 0}

    def close(self) -> None:
        try:
            super().close()
        finally:
            if hasattr(self, "cg"):
                self.cg.remove()


_SRC: dict[str, str] = {}  # "edgeferry@REF" -> a directory holding that ref's packages


def _export(ref: str, wd: Workdir) -> str:
    """The packages of git ref ``ref`` in a directory of ``wd`` (for PYTHONPATH)."""
    dest = wd / ref.replace("/", "_")
    dest.mkdir()
    tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, "edge", "gateway", "edgeferry", "firmware_sim"],
                         check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return str(dest)


def _make(kind: str, pct: int, tag: str) -> JailedEdgeferry | JailedBridge:
    cls: type[JailedEdgeferry] | type[JailedBridge] = JailedEdgeferry if kind.startswith("edgeferry") else JailedBridge
    attrs: dict[str, Any] = {"pct": pct, "src": _SRC.get(kind)}
    if kind == GW_OUTSIDE:
        attrs["gateway_jailed"] = False
    sub = type(cls.__name__, (cls,), attrs)
    return sub(f"{tag}{kind.partition('@')[2][:8]}")


def _usage(pids: dict[str, int]) -> dict[str, tuple[float, int]]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = (cpu_seconds(pid), mem_kb(pid).get("VmHWM", 0))
        except OSError:
            out[name] = (float("nan"), 0)
    return out


def _per100k(a: dict[str, tuple[float, int]], b: dict[str, tuple[float, int]], n: int) -> dict[str, float]:
    return {k: round((b[k][0] - a[k][0]) * 100_000 / max(1, n), 3) for k in a}


def _loadavg() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def _one(kind: str, pct: int, n: int, rnd: int, outage: float | None) -> dict[str, Any]:
    tag = f"{'out' if outage else 'live'}{pct}-{rnd}"
    run = f"jail-{kind}-{tag}"
    p = _make(kind, pct, tag)
    try:
        pids = p.jailed()
        u0, cg0, la0 = _usage(pids), p.cg.stats(), _loadavg()
        row: dict[str, Any] = {}
        if outage:
            # a third live, a third while the cloud is cut (intake offline), a third after
            # the link is back (while the backlog drains)
            third = n // 3
            lg = Loadgen(p.edge.url, third, run, size=SIZE).start()
            p.tail.wait(third, timeout=300, quiet=30, busy_pids=p.sink_pids())
            res = lg.result(timeout=900)
            p.cut()
            t_cut, u_cut = time.monotonic(), _usage(pids)
            off = Loadgen(p.edge.url, third, run, size=SIZE, start=third).start()
            r_off = off.result(timeout=900)
            if isinstance(p, JailedEdgeferry):  # taken in = committed and acknowledged
                def stored(p: JailedEdgeferry = p) -> bool:
                    st = p.status()
                    k = st["counters"] if st else {}
                    return bool(k) and k["received"] >= 2 * third and k["received"] == k["acked_local"]
                wait_until(stored, 300, "the offline third committed")
            u_in = _usage(pids)
            row["offline_intake_msg_s"] = r_off["rate"]
            row["offline_intake_s"] = round(r_off["wall"], 2)
            while time.monotonic() - t_cut < outage:
                time.sleep(0.05)  # a bench schedules its faults on the clock
            u_up = _usage(pids)
            t_up = time.monotonic()
            p.up()
            last = Loadgen(p.edge.url, n - 2 * third, run, size=SIZE, start=2 * third).start()
            w = p.tail.wait(n, timeout=600, quiet=30, busy_pids=p.sink_pids())
            r_last = last.result(timeout=900)
            u1 = _usage(pids)
            row["loadgen_after_up_msg_s"] = r_last["rate"]
            row["drain_s"] = round(w["last"] - t_up, 2) if w["last"] else None
            row["catch_up_msg_s"] = round((n - third) / (w["last"] - t_up)) if w["last"] else None
            # intake while offline: from the cut until the third is taken in (not the idle rest)
            row["cpu_s_per_100k_offline_intake"] = _per100k(u_cut, u_in, third)
            row["cpu_s_per_100k_idle_offline"] = _per100k(u_in, u_up, third)
            row["cpu_s_per_100k_after_up"] = _per100k(u_up, u1, n - third)
            span = None
        else:
            lg = Loadgen(p.edge.url, n, run, size=SIZE).start()
            w = p.tail.wait(n, timeout=600, quiet=30, busy_pids=p.sink_pids())
            res = lg.result(timeout=900)
            u1 = _usage(pids)
            span = (w["last"] - lg.t_start) if w["last"] else None
        cg1 = p.cg.stats()
        c = count_run(p.sink, run, n)
        if c["lost"] or c["duplicated"]:
            p.flag(f"run {run}: lost {c['lost']}, duplicated {c['duplicated']}")
        row.update({
            **c,
            "delivered_msg_s": round(c["delivered"] / span) if span else None,
            "loadgen_msg_s": res["rate"],
            "cpu_s_per_100k": _per100k(u0, u1, c["delivered"]),
            "cpu_pct_one_core": {k: round(100 * (u1[k][0] - u0[k][0]) / span, 1) for k in u0} if span else None,
            "peak_rss_mib": {k: round(u1[k][1] / 1024, 1) for k in u1},
            "throttled_pct_of_periods": round(100 * (cg1["nr_throttled"] - cg0["nr_throttled"])
                                              / max(1, cg1["nr_periods"] - cg0["nr_periods"]), 1),
            "cgroup_peak_mib": round(cg1["mem_max_usage"] / 2**20, 1),
            "oom_kills": cg1["oom_kills"],
            "loadavg": [la0, _loadavg()],
        })
        log(f"{pct}% {kind}{' outage' if outage else ''}: {row}")
        return row
    finally:
        p.close()


def _ceilings(n: int, pct: int) -> dict[str, Any]:
    """The loadgen alone against a free broker, and against a jailed one nobody reads."""
    wd = Workdir("efbench-jailceil-")
    cg = _cgroup(wd, "ceil", pct)
    try:
        free = wd.broker("edge", "free").start()
        jailed = Broker(EDGE_CONF, wd / "jailed", name="jailed", binary=str(cg.mosquitto), die_with_parent=True)
        wd._started.append(jailed)
        jailed.start(timeout=30)
        return {"loadgen_alone_msg_s": run_loadgen(free.url, n, "ceil-free")["rate"],
                "jailed_broker_no_subscriber_msg_s": run_loadgen(jailed.url, n, "ceil-jail")["rate"],
                "loadavg": _loadavg()}
    finally:
        wd.cleanup()
        cg.remove()


def _floor(n: int, pct: int, qos: int) -> dict[str, Any]:
    """The edge broker alone in the quota, serving one subscriber on ``dt/#`` that lives
    outside it (``mosquitto_sub``, a persistent session like the gateway's, acknowledging
    at once): what the broker's own work allows, with no gateway and no bridge in the
    quota. At QoS 1 it is the most any site built on this broker and a QoS 1 session can
    deliver; a bridge pays the same broker work (a PUBLISH out, a PUBACK in) and nothing
    else."""
    wd = Workdir("efbench-jailfloor-")
    cg = _cgroup(wd, f"floor{qos}", pct)
    try:
        b = Broker(EDGE_CONF, wd / "edge", name="edge", binary=str(cg.mosquitto), die_with_parent=True)
        wd._started.append(b)
        b.start(timeout=30)
        out = wd / "sub.out"
        # -d prints the SUBACK (readiness; line-buffered by stdbuf) and a line per PUBLISH; -C exits after n, -W
        # bounds a run where the broker dropped QoS 0 messages
        sub = subprocess.Popen(
            ["stdbuf", "-oL", _MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(b.port), "-q", str(qos), "-c",
             "-i", f"floor-q{qos}", "-t", "dt/#", "-C", str(n), "-W", str(int(60 + n / 500)), "-d"],
            stdout=open(out, "wb"), stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: b"SUBACK" in out.read_bytes(), 30, "mosquitto_sub subscribed")
            bpid = b.pid or 0
            c0, la0 = cpu_seconds(bpid), _loadavg()
            lg = Loadgen(b.url, n, f"floor-q{qos}", size=SIZE).start()
            res = lg.result(timeout=900)
            sub.wait(timeout=120 + n / 500)
            t_end = time.monotonic()
            c1 = cpu_seconds(bpid)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait()
        got = out.read_bytes().count(b"received PUBLISH")
        return {"qos": qos, "delivered": got, "lost": n - got,
                "delivered_msg_s": round(got / (t_end - lg.t_start)), "loadgen_msg_s": res["rate"],
                "broker_cpu_s_per_100k": round((c1 - c0) * 100_000 / n, 3),
                "broker_peak_rss_mib": round(mem_kb(bpid).get("VmHWM", 0) / 1024, 1),
                "loadavg": [la0, _loadavg()]}
    finally:
        wd.cleanup()
        cg.remove()


def run(quick: bool, n: int = 30_000, rounds: int | None = None, outage: float | None = None,
        quotas: tuple[int, ...] = QUOTAS, live_only: bool = False, ab: str | None = None) -> dict[str, Any]:
    why = _available()
    if why is not None:
        return {"skipped": why}
    kinds = ["bridge", "edgeferry"]
    src = Workdir("efbench-jailsrc-")
    if ab:
        _SRC[f"edgeferry@{ab}"] = _export(ab, src)
        kinds.append(f"edgeferry@{ab}")
    try:
        return _run(quick, n, rounds, outage, quotas, live_only, kinds)
    finally:
        src.cleanup()


def _run(quick: bool, n: int, rounds: int | None, outage: float | None, quotas: tuple[int, ...],
         live_only: bool, kinds: list[str]) -> dict[str, Any]:
    rounds = rounds or (1 if quick else 2)
    outage = outage or (10.0 if quick else 60.0)
    out: dict[str, Any] = {
        "command": "python -m bench --only jail" + (" --quick" if quick else ""),
        "machine": machine_info(), "messages": n, "size": SIZE, "outage_s": outage,
        "memory_mib": MEMORY // 2**20, "quotas": {},
    }
    for pct in quotas:
        q: dict[str, Any] = {"ceiling": _ceilings(n, pct)}
        log(f"{pct}%: ceilings {q['ceiling']}")
        scen = ("live",) if live_only else ("live", "outage")
        for sc in scen:
            for rnd in range(rounds):
                # the live rounds also measure the floor: the broker alone in the quota
                # with a QoS 1 (and a QoS 0) subscriber outside it
                order = kinds + ([GW_OUTSIDE] if sc == "live" else [])
                order += ["floor1", "floor0"] if sc == "live" and _MOSQUITTO_SUB_OK else []
                order = order if rnd % 2 == 0 else order[::-1]
                for kind in order:
                    if kind.startswith("floor"):
                        row = _floor(n, pct, int(kind[-1]))
                        log(f"{pct}% {kind}: {row}")
                        q.setdefault("floor", {}).setdefault(f"qos{kind[-1]}", []).append(row)
                        continue
                    row = _one(kind, pct, n, rnd, outage if sc == "outage" else None)
                    q.setdefault(sc, {}).setdefault(kind, []).append(row)
        out["quotas"][str(pct)] = q
    return out


def _med(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def summary(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"  skipped: {res['skipped']}"
    lines = [f"  {res['messages']} QoS 1 messages of {res['size']} B; edge side in a cgroup of "
             f"{res['memory_mib']} MiB; outage {res['outage_s']:.0f} s"]
    for pct, q in res["quotas"].items():
        c = q["ceiling"]
        lines.append(f"  {pct}% of one core: loadgen alone {c['loadgen_alone_msg_s']:.0f} msg/s, "
                     f"jailed broker with no subscriber {c['jailed_broker_no_subscriber_msg_s']:.0f} msg/s "
                     f"(load {c['loadavg']})")
        if not _MOSQUITTO_SUB_OK:
            lines.append("    floor: not measured (no mosquitto_sub: Debian's mosquitto-clients)")
        for name, rows in q.get("floor", {}).items():
            lines.append(f"    floor  broker alone, {name} subscriber outside: "
                         + "/".join(str(r["delivered_msg_s"]) for r in rows) + " msg/s delivered, lost "
                         + "/".join(str(r["lost"]) for r in rows) + "; broker CPU s/100k "
                         + "/".join(str(r["broker_cpu_s_per_100k"]) for r in rows)
                         + f"; load {[r['loadavg'][1] for r in rows]}")
        for sc in ("live", "outage"):
            for kind, rows in q.get(sc, {}).items():
                key = "catch_up_msg_s" if sc == "outage" else "delivered_msg_s"
                rates = [r[key] or 0 for r in rows]
                lost = sum(r["lost"] for r in rows)
                dup = sum(r["duplicated"] for r in rows)
                cpu = {k: _med([r["cpu_s_per_100k"][k] for r in rows]) for k in rows[0]["cpu_s_per_100k"]}
                rss = {k: max(r["peak_rss_mib"][k] for r in rows) for k in rows[0]["peak_rss_mib"]}
                extra = ""
                if sc == "outage":
                    extra = (" (catch-up after the outage); offline intake "
                             + "/".join(f"{r['offline_intake_msg_s']:.0f}" for r in rows) + " msg/s, "
                             + "drain " + "/".join(str(r["drain_s"]) for r in rows) + " s; offline CPU/100k "
                             + json.dumps({k: _med([r["cpu_s_per_100k_offline_intake"][k] for r in rows])
                                           for k in cpu}))
                lines.append(f"    {sc:<6} {kind:<9} {'/'.join(f'{x:.0f}' for x in rates)} msg/s "
                             f"lost {lost} dup {dup}; CPU s/100k {json.dumps(cpu)}; peak RSS MiB "
                             f"{json.dumps(rss)}; load {[r['loadavg'][1] for r in rows]}{extra}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--messages", type=int, default=30_000)
    p.add_argument("--rounds", type=int)
    p.add_argument("--outage", type=float)
    p.add_argument("--quotas", default=",".join(map(str, QUOTAS)), help="%% of one core, e.g. 10,25")
    p.add_argument("--live-only", action="store_true")
    p.add_argument("--ab", metavar="REF", help="also run the gateway of this git ref (interleaved)")
    a = p.parse_args()
    # SIGTERM ends the run like Ctrl-C: the cgroups and temp dirs are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = run(a.quick, a.messages, a.rounds, a.outage, tuple(int(x) for x in a.quotas.split(",")), a.live_only,
              a.ab)
    print(json.dumps(res, indent=2))
    print(summary(res))


if __name__ == "__main__":
    main()
