"""Uplink benchmark (issue 2): the edgeferry gateway + ingest against Mosquitto's own bridge.

Both pipelines run on this machine in the same run, from the same broker configs
(deploy/mosquitto/edge.conf and cloud.conf, started by edgeferry.procs.Broker exactly as
the tests start them), with the same TCP proxy on the cloud link (the tests' chaos
proxy, firmware_sim.chaos.ThreadedChaosProxy):

    edgeferry: loadgen -> edge mosquitto -> gateway (SQLite) -> proxy -> cloud mosquitto
               -> edgeferry ingest -> JSONL
    bridge:    loadgen -> edge mosquitto (bridge) ----------> proxy -> cloud mosquitto
               -> bench.bridge_sink -> JSONL

Every scenario counts sent / delivered / lost / duplicated at the sink by the message
number ``n`` in each payload, with its own run id.

    .venv/bin/python -m bench --only uplink [--quick]
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench._util import (
    PY,
    Loadgen,
    SinkTail,
    Workdir,
    count_run,
    cpu_seconds,
    io_write_bytes,
    mem_kb,
    payload_bytes,
    run_loadgen,
    terminate_timed,
    wait_line,
    wait_until,
)
from edgeferry.procs import Broker, Proc
from firmware_sim.chaos import ThreadedChaosProxy

NAME = "uplink"
LOGS = Path(__file__).resolve().parent / "results" / "logs"
BACKOFF = "1s"          # gateway --backoff-max
RESTART_TIMEOUT = "1 1"  # bridge restart_timeout: base 1 s, cap 1 s (see _bridge_lines)
BRIDGE_ID = "bench-bridge"
PROXY = "firmware_sim.chaos.ThreadedChaosProxy"


def _bridge_connects(cloud: Broker) -> int:
    """How many times the bridge connected to the cloud broker (its log says so)."""
    return cloud.log_text().count(f" as {BRIDGE_ID} ")


def _log(msg: str) -> None:
    print(f"  [uplink {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _bridge_lines(proxy_port: int) -> list[str]:
    return [
        "",
        "# bench: Mosquitto's own bridge, configured for reliability",
        "connection cloud",
        f"address 127.0.0.1:{proxy_port}",
        "topic dt/# out 1",
        "cleansession false",
        "bridge_protocol_version mqttv311",
        f"remote_clientid {BRIDGE_ID}",
        f"restart_timeout {RESTART_TIMEOUT}",
    ]


class Pipeline:
    """Brokers, proxy, forwarder and sink of one pipeline in one temp dir."""

    kind = ""

    def __init__(self, tag: str) -> None:
        self.wd = Workdir(f"efbench-{self.kind}-{tag}-")
        self.sink = self.wd / "sink.jsonl"
        self.tail = SinkTail(self.sink)
        self.proxy: ThreadedChaosProxy | None = None
        self.cloud = self.wd.broker("cloud", "cloud")
        self.edge: Broker

    @property
    def proxy_url(self) -> str:
        assert self.proxy is not None
        return f"mqtt://127.0.0.1:{self.proxy.port}"

    def cut(self) -> None:
        assert self.proxy is not None
        self.proxy.cut()

    def up(self) -> None:
        assert self.proxy is not None
        self.proxy.up()

    def forwarder_pid(self) -> int:
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        raise NotImplementedError

    def sink_pids(self) -> tuple[int, ...]:
        pids = self.pids()
        return (pids["sink"],)

    def cpu(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids().items():
            try:
                out[name] = cpu_seconds(pid)
            except OSError:
                out[name] = float("nan")
        return out

    def wait_backlog(self, n: int, timeout: float | None = None) -> float:
        return 0.0

    anomaly = ""

    def flag(self, what: str) -> None:
        """Mark this run as anomalous: its logs are kept in bench/results/logs/."""
        self.anomaly = self.anomaly or what

    def _start_common(self) -> None:
        self.cloud.start()
        self.proxy = ThreadedChaosProxy(self.cloud.host, self.cloud.port).start()

    def close(self) -> None:
        # every run's logs and configs are kept (small); anomalies are said out loud
        dest = LOGS / f"{time.strftime('%H%M%S')}-{self.wd.path.name.rsplit('-', 1)[0]}"
        self.wd.keep_logs(dest)
        if self.anomaly or sys.exc_info()[0] is not None:
            _log(f"{self.kind}: {self.anomaly or 'error'}: logs kept in {dest}")
        self.tail.close()
        try:
            if self.proxy is not None:
                self.proxy.stop()
        finally:
            self.wd.cleanup()


class Edgeferry(Pipeline):
    kind = "edgeferry"

    def __init__(self, tag: str, *, sync: str = "full", extra: tuple[str, ...] = ()) -> None:
        super().__init__(tag)
        try:
            self._start(sync, extra)
        except BaseException:
            self.close()
            raise

    def _start(self, sync: str, extra: tuple[str, ...]) -> None:
        self._start_common()
        self.sync = sync
        self.store = self.wd / "store.db"
        self.edge = self.wd.broker("edge", "edge").start()
        self.ingest = self.wd.proc("ingest", [
            PY, "-m", "edgeferry", "ingest", "run", "--cloud", self.cloud.url,
            "--sink", f"jsonl:{self.sink}", "--client-id", "bench-ingest"]).start()
        wait_line(self.ingest, "ingest ready")
        self.gateway_argv = [
            PY, "-m", "edgeferry", "gateway", "run", "--local", self.edge.url,
            "--cloud", self.proxy_url, "--store", str(self.store), "--node-id", "bench",
            "--uplink", "dt/#", "--backoff-max", BACKOFF, "--keepalive", "10s", "--sync", sync,
            *extra]
        self.start_gateway()
        self.wait_links(local=True, cloud=True)

    def start_gateway(self, *, wait: bool = True) -> None:
        """Start the gateway (a new process each time, on the same store and log)."""
        self.gateway: Proc = self.wd.proc("gateway", self.gateway_argv).start()
        if wait:
            wait_line(self.gateway, "gateway ready", timeout=30)

    def status(self) -> dict[str, Any] | None:
        from gateway.health import query_status

        return query_status(self.store)

    def wait_links(self, *, local: bool | None = None, cloud: bool | None = None,
                   timeout: float = 30) -> None:
        def ok() -> bool:
            st = self.status()
            if not st:
                return False
            link = st["link"]
            return ((local is None or (link["local"] == "up") == local)
                    and (cloud is None or (link["cloud"] == "up") == cloud))
        wait_until(ok, timeout, f"gateway links local={local} cloud={cloud}")

    def store_files(self) -> dict[str, int]:
        """Sizes of the store file and its WAL (a shrunk WAL means a checkpoint ran)."""
        return {f.name: f.stat().st_size for f in self.wd.path.glob("store.db*")
                if f.is_file() and not f.name.endswith(".sock")}

    def timeline(self, t0: float, interval: float = 0.25) -> tuple[list[tuple], Any]:
        """Sample the gateway in a thread until the returned stop() is called:
        (s since t0, uplinked records, cloud connects, store backlog, sink lines)."""
        import threading

        out: list[tuple] = []
        stop = threading.Event()
        tail = SinkTail(self.sink)

        def run() -> None:
            while not stop.wait(interval):
                st = self.status()
                if st:
                    k = st["counters"]
                    out.append((round(time.monotonic() - t0, 2), k["uplinked_records"],
                                k["cloud_connects"],
                                sum(ln["records"] for ln in st["lanes"].values()),
                                tail.poll()))
        th = threading.Thread(target=run, name="timeline", daemon=True)
        th.start()

        def done() -> None:
            stop.set()
            th.join(5)
            tail.close()
        return out, done

    def commits(self) -> int:
        st = self.status()
        return int(st["counters"]["commits"]) if st else -1

    def backlog(self) -> int:
        st = self.status()
        return sum(ln["records"] for ln in st["lanes"].values()) if st else -1

    def wait_backlog(self, n: int, timeout: float | None = None) -> float:
        t0 = time.monotonic()
        timeout = timeout or 60 + n / 2000

        def held() -> bool:
            # the status counts a record in its lane before its commit is done: wait also
            # until every message received was committed and acknowledged to the broker
            st = self.status()
            if not st:
                return False
            k = st["counters"]
            records = sum(ln["records"] for ln in st["lanes"].values())
            return records >= n and k["received"] == k["acked_local"]
        wait_until(held, timeout, f"{n} records committed in the gateway store")
        return time.monotonic() - t0

    def forwarder_pid(self) -> int:
        return self.gateway.pid

    def pids(self) -> dict[str, int]:
        return {"gateway": self.gateway.pid, "edge_broker": self.edge.pid,
                "cloud_broker": self.cloud.pid, "sink": self.ingest.pid,
                "bench_proxy_and_poller": os.getpid()}


class Bridge(Pipeline):
    kind = "bridge"

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        self._start_common()
        self.sinkp = self.wd.proc("bridge_sink", [
            PY, "-m", "bench.bridge_sink", "--cloud", self.cloud.url, "--sink", str(self.sink),
            "--client-id", "bench-bridge-sink", "--filter", "dt/#"]).start()
        wait_line(self.sinkp, "sink ready")
        assert self.proxy is not None
        self.edge = self.wd.broker("edge", "edge", extra=_bridge_lines(self.proxy.port))
        self.start_edge()

    def start_edge(self, *, wait_bridge: bool = True) -> None:
        mark = self.cloud.mark()
        self.edge.start()
        if wait_bridge:
            self.cloud.wait_for_log(f" as {BRIDGE_ID} ", 30, since=mark)

    def forwarder_pid(self) -> int:
        return self.edge.pid

    def pids(self) -> dict[str, int]:
        return {"edge_broker": self.edge.pid, "cloud_broker": self.cloud.pid,
                "sink": self.sinkp.pid, "bench_proxy_and_poller": os.getpid()}


PIPELINES = {"edgeferry": Edgeferry, "bridge": Bridge}


def _count(p: Pipeline, run: str, n: int) -> dict[str, int]:
    c = count_run(p.sink, run, n)
    if c["lost"] or c["duplicated"] or c["stray"]:
        p.flag(f"run {run}: lost {c['lost']}, duplicated {c['duplicated']}")
    return c


def _per100k(cpu0: dict[str, float], cpu1: dict[str, float], n: int) -> dict[str, float]:
    return {k: round((cpu1[k] - cpu0[k]) * 100000 / n, 3) for k in cpu0 if n}


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# ------------------------------------------------------------------ scenarios

def live(n: int, ceiling_n: int, reps: int) -> dict[str, Any]:
    """1 + 6: live throughput and CPU, and the load generator's own ceiling."""
    out: dict[str, Any] = {"messages": n, "size": 100, "devices": 10}
    wd = Workdir("efbench-ceiling-")
    try:
        b = wd.broker("edge", "edge").start()
        ceil = []
        for i in range(reps):
            r = run_loadgen(b.url, ceiling_n, f"ceil{i}")
            ceil.append(r["rate"])
        out["loadgen_ceiling_msg_s"] = ceil
        _log(f"loadgen alone: {ceil} msg/s")
    finally:
        wd.cleanup()
    for rep in range(reps):
        # alternate the order, so neither pipeline always runs first
        for kind in (("bridge", "edgeferry") if rep % 2 == 0 else ("edgeferry", "bridge")):
            p = PIPELINES[kind](f"live{rep}")
            try:
                run = f"live-{kind}-{rep}"
                cpu0 = p.cpu()
                lg = Loadgen(p.edge.url, n, run).start()
                w = p.tail.wait(n, timeout=300, quiet=15, busy_pids=p.sink_pids())
                res = lg.result()
                cpu1 = p.cpu()
                c = _count(p, run, n)
                span = (w["last"] - w["first"]) if w["first"] else None
                row = {
                    **c,
                    "sink_rate_msg_s": _r(c["delivered"] / span, 0) if span else None,
                    "end_to_end_s": _r(w["last"] - lg.t_start) if w["last"] else None,
                    "end_to_end_msg_s": _r(c["delivered"] / (w["last"] - lg.t_start), 0)
                    if w["last"] else None,
                    "loadgen_msg_s": res["rate"],
                    "cpu_s_per_100k": _per100k(cpu0, cpu1, c["delivered"]),
                    "forwarder_rss_kb": mem_kb(p.forwarder_pid()),
                }
                out.setdefault(kind, []).append(row)
                _log(f"live {kind}: {row}")
            finally:
                p.close()
    return out


def drain(n: int) -> dict[str, Any]:
    """2 + 5 (outage) + 6 (drain CPU): a backlog built while the link is cut, then up()."""
    out: dict[str, Any] = {"messages": n, "gateway_backoff_max": BACKOFF,
                           "bridge_restart_timeout": RESTART_TIMEOUT}
    for kind in ("bridge", "edgeferry"):
        p = PIPELINES[kind]("drain")
        try:
            run = f"drain-{kind}"
            p.cut()
            if isinstance(p, Edgeferry):
                p.wait_links(cloud=False)
            cpu0 = p.cpu()
            lg = run_loadgen(p.edge.url, n, run)
            p.wait_backlog(n)
            cpu1 = p.cpu()
            time.sleep(1.5)  # let reconnect attempts fail a few times: a real outage
            cpu2 = p.cpu()
            tl, tl_stop, base = [], None, 0
            if isinstance(p, Edgeferry):
                base = (p.status() or {"counters": {"uplinked_records": 0}})["counters"][
                    "uplinked_records"]
            t_up = time.monotonic()
            if isinstance(p, Edgeferry):
                tl, tl_stop = p.timeline(t_up, 0.1)
            p.up()
            w = p.tail.wait(n, timeout=600, quiet=15, busy_pids=p.sink_pids())
            cpu3 = p.cpu()
            if tl_stop is not None:
                # ingest may write the last records before the gateway counts them as
                # uplinked: sample on until a sample shows all of them (or 10 s)
                try:
                    wait_until(lambda tl=tl, base=base: any(up - base >= n for _, up, *_ in tl), 10,
                               "the gateway to count every record uplinked", 0.05)
                except AssertionError:
                    p.flag("the gateway did not count every record uplinked")
                tl_stop()
            c = _count(p, run, n)
            row = {
                **c,
                "loadgen_msg_s": lg["rate"],
                "reconnect_s": _r(w["first"] - t_up) if w["first"] else None,
                "drain_s": _r(w["last"] - w["first"]) if w["first"] else None,
                "drain_msg_s": _r(c["delivered"] / (w["last"] - w["first"]), 0)
                if w["first"] and w["last"] > w["first"] else None,
                "up_to_last_s": _r(w["last"] - t_up) if w["last"] else None,
                "cpu_s_per_100k_intake": _per100k(cpu0, cpu1, n),
                "cpu_s_per_100k_drain": _per100k(cpu2, cpu3, c["delivered"]),
                "forwarder_peak_rss_kb": mem_kb(p.forwarder_pid())["VmHWM"],
                "sink_peak_rss_kb": mem_kb(p.sink_pids()[0])["VmHWM"],
            }
            if tl:
                # when the gateway had every record acknowledged by the cloud broker (the
                # rest of the drain is ingest writing its sink), sampled every 0.1 s
                done = [t for t, up, *_ in tl if up - base >= n]
                row["gateway_all_uplinked_s"] = done[0] if done else None
            out[kind] = row
            _log(f"drain {kind}: {row}")
        finally:
            p.close()
    return out


def cold_start(n: int) -> dict[str, Any]:
    """3: messages queued at the local broker for the gateway's session while it was down."""
    p = Edgeferry("cold")
    try:
        run = "cold"
        stopped = terminate_timed(p.gateway)  # None: it did not exit on SIGTERM and was killed
        lg = run_loadgen(p.edge.url, n, run)
        t0 = time.monotonic()
        p.start_gateway(wait=False)
        # how far ahead of the gateway's acknowledgements the broker ran (its window is
        # max_inflight_messages): the largest received - acked_local seen
        ahead = [0]

        def sample() -> None:
            st = p.status()
            if st:
                k = st["counters"]
                ahead[0] = max(ahead[0], k["received"] - k["acked_local"])
        w = p.tail.wait(n, timeout=300, quiet=15, on_first=sample, busy_pids=p.sink_pids())
        c = _count(p, run, n)
        m = mem_kb(p.gateway.pid)
        row = {**c, "messages": n, "loadgen_msg_s": lg["rate"],
               "start_to_first_s": _r(w["first"] - t0) if w["first"] else None,
               "start_to_last_s": _r(w["last"] - t0) if w["last"] else None,
               "gateway_peak_rss_kb": m["VmHWM"], "gateway_rss_after_kb": m["VmRSS"],
               "unacked_at_first_record": ahead[0],
               "gateway_sigterm_exit_s": _r(stopped)}
        _log(f"cold start: {row}")
        return row
    finally:
        p.close()


def memory(n: int, steps: int = 4) -> dict[str, Any]:
    """4: RSS holding a backlog of n messages (cut link), sampled at every n/steps."""
    out: dict[str, Any] = {"messages": n}
    chunk = n // steps
    for kind in ("bridge", "edgeferry"):
        p = PIPELINES[kind]("mem")
        try:
            run = f"mem-{kind}"
            p.cut()
            if isinstance(p, Edgeferry):
                p.wait_links(cloud=False)
            pid = p.forwarder_pid()
            samples = [{"backlog": 0, **mem_kb(pid)}]
            rates = []
            for k in range(steps):
                lg = run_loadgen(p.edge.url, chunk, run, start=k * chunk)
                rates.append(lg["rate"])
                p.wait_backlog((k + 1) * chunk)
                s: dict[str, Any] = {"backlog": (k + 1) * chunk, **mem_kb(pid)}
                if isinstance(p, Edgeferry):
                    s["store_file_bytes"] = sum(
                        f.stat().st_size for f in p.wd.path.glob("store.db*") if f.is_file())
                    s["edge_broker_rss_kb"] = mem_kb(p.edge.pid)["VmRSS"]
                samples.append(s)
                _log(f"memory {kind}: {s}")
            # then restore the link and count what the big backlog delivered
            t_up = time.monotonic()
            tl, tl_stop = p.timeline(t_up, 1.0) if isinstance(p, Edgeferry) else ([], None)
            p.up()
            w = p.tail.wait(chunk * steps, timeout=600, quiet=15, busy_pids=p.sink_pids())
            if tl_stop is not None:
                tl_stop()
            c = _count(p, run, chunk * steps)
            out[kind] = {"samples": samples, "loadgen_msg_s": rates,
                         "who": "gateway process" if kind == "edgeferry"
                         else "edge mosquitto (bridge queue)",
                         "peak_rss_kb_after_drain": mem_kb(pid)["VmHWM"],
                         "sink_peak_rss_kb": mem_kb(p.sink_pids()[0])["VmHWM"],
                         "drain": {**c, "up_to_last_s": _r(w["last"] - t_up)
                                   if w["last"] else None},
                         "drain_timeline": tl}
            _log(f"memory {kind}: drained {out[kind]['drain']}")
        finally:
            p.close()
    return out


# gateway settings compared in 5 (kill -9) and 7 (flash wear): name -> (--sync, extra flags)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "full": ("full", ()),  # the defaults: --sync full --commit-interval 200ms
    "normal": ("normal", ()),
    "full-ci50": ("full", ("--commit-interval", "50ms")),
}


def kill9(n: int, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, Any]:
    """5: kill -9 the edge side while it holds a backlog; restart; restore the link; count."""
    out: dict[str, Any] = {"messages": n}
    for kind in ("bridge", *(f"edgeferry-{v}" for v in variants)):
        if kind == "bridge":
            p: Pipeline = Bridge("kill")
        else:
            sync, extra = VARIANTS[kind.split("-", 1)[1]]
            p = Edgeferry("kill", sync=sync, extra=extra)
        try:
            run = f"kill-{kind}"
            p.cut()
            if isinstance(p, Edgeferry):
                p.wait_links(cloud=False)
            run_loadgen(p.edge.url, n, run)
            p.wait_backlog(n)
            if isinstance(p, Edgeferry):
                p.gateway.kill9()
                p.edge.kill()
                p.edge.start()
                p.start_gateway()
            else:
                assert isinstance(p, Bridge)
                p.edge.kill()
                p.start_edge(wait_bridge=False)
            mark = _bridge_connects(p.cloud)
            t_up = time.monotonic()
            p.up()
            w = p.tail.wait(n, timeout=300, quiet=8, busy_pids=p.sink_pids())
            c = _count(p, run, n)
            row = {**c, "up_to_last_s": _r(w["last"] - t_up) if w["last"] else None}
            if isinstance(p, Bridge):
                # evidence that a zero is a loss, not a bridge that never came back
                connects = _bridge_connects(p.cloud)
                row["bridge_reconnected"] = connects > mark
            out[kind] = row
            _log(f"kill -9 {kind}: {row}")
        finally:
            p.close()
    return out


def flash(rate: int, seconds: int, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, Any]:
    """7: bytes the gateway writes per payload byte, online and during an outage."""
    n = rate * seconds
    out: dict[str, Any] = {"rate_msg_s": rate, "seconds": seconds, "messages": n}
    for variant in variants:
        sync, extra = VARIANTS[variant]
        p = Edgeferry(f"flash-{sync}", sync=sync, extra=extra)
        try:
            gw = p.gateway.pid
            row: dict[str, Any] = {}
            # online: link up; count until everything reached the sink and was removed
            run = f"flash-{variant}-on"
            pb = payload_bytes(run, n, 100)
            io0, k0 = io_write_bytes(gw), p.commits()
            run_loadgen(p.edge.url, n, run, rate=rate)
            p.tail.wait(n, timeout=120, quiet=10, busy_pids=p.sink_pids())
            wait_until(lambda p=p: p.backlog() == 0, 30, "the store to empty", 0.05)
            time.sleep(1.2)  # the next commit carries the last deletes
            io1, k1 = io_write_bytes(gw), p.commits()
            c = _count(p, run, n)
            row["online"] = {"write_bytes": io1 - io0, "payload_bytes": pb,
                             "ratio": _r((io1 - io0) / pb, 2), "commits": k1 - k0,
                             "bytes_per_commit": (io1 - io0) // max(1, k1 - k0),
                             "lost": c["lost"], "duplicated": c["duplicated"],
                             "files_after": p.store_files()}
            # outage: same load with the link cut; count until all of it is in the store
            run = f"flash-{variant}-off"
            pb = payload_bytes(run, n, 100)
            p.cut()
            p.wait_links(cloud=False)
            io0, k0 = io_write_bytes(gw), p.commits()
            run_loadgen(p.edge.url, n, run, rate=rate)
            p.wait_backlog(n)
            time.sleep(1.2)
            io1, k1 = io_write_bytes(gw), p.commits()
            row["outage"] = {"write_bytes": io1 - io0, "payload_bytes": pb,
                             "ratio": _r((io1 - io0) / pb, 2), "commits": k1 - k0,
                             "bytes_per_commit": (io1 - io0) // max(1, k1 - k0),
                             "files_after": p.store_files()}
            out[variant] = row
            _log(f"flash {variant}: {row}")
        finally:
            p.close()
    return out


def run(quick: bool) -> dict[str, Any]:
    if quick:
        n, mem_n, reps, flash_s = 20000, 200000, 1, 3
    else:
        n, mem_n, reps, flash_s = 100000, 1000000, 2, 10
    results: dict[str, Any] = {
        "quick": quick,
        "config": {"gateway": f"--backoff-max {BACKOFF} --keepalive 10s (defaults otherwise)",
                   "bridge": _bridge_lines(0)[2:], "proxy": PROXY},
    }
    scenarios = [
        ("live", lambda: live(n, n, reps)),
        ("drain", lambda: drain(n)),
        ("cold_start", lambda: cold_start(n)),
        ("kill9", lambda: kill9(n)),
        ("flash", lambda: flash(2000, flash_s)),
        ("memory", lambda: memory(mem_n)),
    ]
    shutil.rmtree(LOGS, ignore_errors=True)  # the logs of the previous run
    only = os.environ.get("EFBENCH_SCENARIOS")
    for name, fn in scenarios:
        if only and name not in only.split(","):
            continue
        t0 = time.monotonic()
        _log(f"scenario {name} ...")
        try:
            results[name] = fn()
        except Exception as e:  # a failed scenario is reported, the others still run
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            _log(f"scenario {name} FAILED: {e}")
        results[name]["elapsed_s"] = round(time.monotonic() - t0, 1)
    return results


# ------------------------------------------------------------------ summary

def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ok(cond: bool | None) -> str:
    return "-" if cond is None else ("met" if cond else "MISSED")


def _lost_dup(r: dict[str, Any]) -> str:
    return f"{r['lost']} / {r['duplicated']}"


Row = tuple[str, Any, Any, str, str, str]


def _rows_live(lv: dict[str, Any]) -> list[Row]:
    ef, br = lv["edgeferry"], lv["bridge"]

    def med(rows: list[dict[str, Any]], *keys: str) -> float | None:
        vals = []
        for r in rows:
            for k in keys:
                r = r[k]
            vals.append(r)
        return _median(vals)
    e, b = med(ef, "sink_rate_msg_s"), med(br, "sink_rate_msg_s")
    ratio = e / b if e and b else None
    return [
        ("1 live: delivered msg/s at the sink (median)", e, b,
         f"{ratio:.2f}x" if ratio else "-", ">= 1x bridge", _ok(ratio >= 1 if ratio else None)),
        ("1 live: loadgen msg/s while feeding the pipeline", med(ef, "loadgen_msg_s"),
         med(br, "loadgen_msg_s"), "", "", ""),
        ("1 live: loadgen ceiling alone (msg/s, median)", _median(lv["loadgen_ceiling_msg_s"]),
         None, "", "", ""),
        ("1 live: lost / duplicated (all runs)", f"{sum(r['lost'] for r in ef)} / "
         f"{sum(r['duplicated'] for r in ef)}", f"{sum(r['lost'] for r in br)} / "
         f"{sum(r['duplicated'] for r in br)}", "", "", ""),
        ("6 CPU s/100k live: gateway | edge mosquitto", med(ef, "cpu_s_per_100k", "gateway"),
         med(br, "cpu_s_per_100k", "edge_broker"), "", "", ""),
        ("6 CPU s/100k live: edge mosquitto", med(ef, "cpu_s_per_100k", "edge_broker"),
         med(br, "cpu_s_per_100k", "edge_broker"), "", "", ""),
        ("6 CPU s/100k live: sink process", med(ef, "cpu_s_per_100k", "sink"),
         med(br, "cpu_s_per_100k", "sink"), "", "", ""),
    ]


def _rows_drain(dr: dict[str, Any]) -> list[Row]:
    e, b = dr["edgeferry"], dr["bridge"]
    sp = b["drain_s"] / e["drain_s"] if e["drain_s"] and b["drain_s"] else None
    return [
        ("2 reconnect delay: up() -> first record (s)", e["reconnect_s"], b["reconnect_s"],
         "", "", ""),
        (f"2 drain {dr['messages']:,}: first -> last record (s)", e["drain_s"], b["drain_s"],
         f"{sp:.1f}x faster" if sp else "-", ">= 3x faster", _ok(sp >= 3 if sp else None)),
        ("2 drain rate (msg/s)", e["drain_msg_s"], b["drain_msg_s"], "", "", ""),
        ("2 gateway: all acked by the cloud broker (s after up())",
         e.get("gateway_all_uplinked_s"), None, "", "", ""),
        ("2 sink process peak RSS during the drain (MiB)", e["sink_peak_rss_kb"] / 1024,
         b["sink_peak_rss_kb"] / 1024, "", "", ""),
        ("5 outage: lost / duplicated", _lost_dup(e), _lost_dup(b), "", "0 lost",
         _ok(e["lost"] == 0)),
        ("6 CPU s/100k drain: gateway | edge mosquitto", e["cpu_s_per_100k_drain"]["gateway"],
         b["cpu_s_per_100k_drain"]["edge_broker"], "", "", ""),
        ("6 CPU s/100k offline intake: gateway | edge mosq.",
         e["cpu_s_per_100k_intake"]["gateway"], b["cpu_s_per_100k_intake"]["edge_broker"],
         "", "", ""),
    ]


def _rows_cold(cs: dict[str, Any]) -> list[Row]:
    t = cs["start_to_last_s"]
    return [
        (f"3 cold start, {cs['messages']:,} queued: start -> last record (s)", t, None, "",
         "<= 3 s", _ok(t is not None and t <= 3 and cs["lost"] == 0)),
        ("3 cold start: gateway peak RSS (MiB)", cs["gateway_peak_rss_kb"] / 1024, None,
         "", "", ""),
    ]


def _rows_memory(mem: dict[str, Any]) -> list[Row]:
    es, bs = mem["edgeferry"]["samples"], mem["bridge"]["samples"]
    rows: list[Row] = []
    for s_e, s_b in zip(es[1:], bs[1:], strict=False):
        rows.append((f"4 peak RSS (MiB), {s_e['backlog']:,} backlog", s_e["VmHWM"] / 1024,
                     s_b["VmHWM"] / 1024, "", "", ""))
    peak = es[-1]["VmHWM"] / 1024
    growth = (es[-1]["VmHWM"] - es[1]["VmHWM"]) / 1024
    de, db = mem["edgeferry"]["drain"], mem["bridge"]["drain"]
    rows += [
        (f"4 gateway peak RSS; growth after {es[1]['backlog']:,} (MiB)",
         f"{peak:.1f}; +{growth:.1f}", None, "", "< 35 MB, flat", _ok(peak < 35 and growth < 2)),
        ("4/5 that backlog after up(): lost / duplicated", _lost_dup(de), _lost_dup(db),
         "", "", ""),
        ("4 that backlog: up() -> last record (s)", de["up_to_last_s"], db["up_to_last_s"],
         "", "", ""),
    ]
    return rows


def _rows_kill9(k9: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for kind, row in k9.items():
        if kind.startswith("edgeferry"):
            rows.append((f"5 kill -9 edge side holding {k9['messages']:,} ({kind[10:]})",
                         _lost_dup(row), _lost_dup(k9["bridge"]), "lost / dup", "0 lost",
                         _ok(row["lost"] == 0)))
    return rows


def _rows_flash(fl: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for variant, (sync, extra) in VARIANTS.items():
        if variant in fl:
            flags = " ".join(("--sync", sync, *extra))
            for mode in ("online", "outage"):
                r = fl[variant][mode]
                rows.append((f"7 flash bytes/payload, {mode}, {flags}", r["ratio"], None, "",
                             "<= 3", _ok(r["ratio"] <= 3)))
    return rows


def table(res: dict[str, Any]) -> list[Row]:
    """Rows: (what, edgeferry, bridge, ratio, target, verdict)."""
    rows: list[Row] = []
    parts = [("live", "edgeferry", _rows_live), ("drain", "edgeferry", _rows_drain),
             ("cold_start", "start_to_last_s", _rows_cold), ("memory", "edgeferry", _rows_memory),
             ("kill9", "bridge", _rows_kill9), ("flash", "messages", _rows_flash)]
    for name, key, fn in parts:
        part = res.get(name) or {}
        if key in part:
            rows += fn(part)
    return rows


def summary(res: dict[str, Any]) -> str:
    rows = table(res)
    head = ("what", "edgeferry", "bridge", "ratio", "target", "")
    cells = [head] + [(a, _fmt(b), _fmt(c), d, e, f) for a, b, c, d, e, f in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(6)]
    lines = []
    for i, r in enumerate(cells):
        lines.append("  " + "  ".join(
            r[j].ljust(widths[j]) if j in (0, 3, 4, 5) else r[j].rjust(widths[j])
            for j in range(6)))
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    errors = [f"  {k}: {v['error']}" for k, v in res.items()
              if isinstance(v, dict) and "error" in v]
    if errors:
        lines += ["  scenarios that failed:"] + errors
    return "\n".join(lines)
