"""The two pipelines the uplink benchmark compares, each in its own temp dir with its
brokers, proxy, forwarder and sink (see bench/bench_uplink.py):

    edgeferry: edge mosquitto -> gateway (SQLite) -> proxy -> cloud mosquitto -> ingest
    bridge:    edge mosquitto (bridge) ----------> proxy -> cloud mosquitto -> bench.bridge_sink

Brokers and processes are edgeferry.procs' (as in the tests); the proxy is the tests'
chaos proxy.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from bench._util import PY, REPO, SinkTail, Workdir, cpu_seconds, pid_of, wait_line, wait_until
from edgeferry.procs import Broker, Proc
from firmware_sim.chaos_thread import ThreadedChaosProxy

__all__ = ["BACKOFF", "BRIDGE_ID", "LOGS", "PIPELINES", "PROXY", "RESTART_TIMEOUT", "Bridge",
           "Edgeferry", "Pipeline", "VARIANTS", "bridge_connects", "bridge_lines", "build_accelerator", "export",
           "log"]

LOGS = Path(__file__).resolve().parent / "results" / "logs"
BACKOFF = "1s"          # gateway --backoff-max
RESTART_TIMEOUT = "1 1"  # bridge restart_timeout: base 1 s, cap 1 s (see bridge_lines)
BRIDGE_ID = "bench-bridge"
PROXY = "firmware_sim.chaos_thread.ThreadedChaosProxy"


def bridge_connects(cloud: Broker) -> int:
    """How many times the bridge connected to the cloud broker (its log says so)."""
    return cloud.log_text().count(f" as {BRIDGE_ID} ")


PACKAGES = ("edge", "gateway", "edgeferry", "firmware_sim")


def export(ref: str, dest: Path) -> str:
    """The packages of git ref ``ref`` in ``dest`` (``worktree``: a copy of the checkout's
    files as they are, uncommitted changes included), for a gateway and an ingest run from
    there (cwd and PYTHONPATH), so that both sides of an A/B run exported code: the
    editable install costs more per message than an export (docs/benchmarks.md)."""
    dest.mkdir(parents=True)
    if ref == "worktree":
        for pkg in PACKAGES:
            shutil.copytree(REPO / pkg, dest / pkg,
                            ignore=shutil.ignore_patterns("__pycache__", "data"))
    else:
        tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, *PACKAGES],
                             check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    build_accelerator(str(dest))
    return str(dest)


def build_accelerator(dest: str) -> None:
    """Compile an export's edge/_cparse.c in place with the flags setuptools uses, as
    ``pip install`` does in a checkout (a ref without it parses in pure Python)."""
    src = os.path.join(dest, "edge", "_cparse.c")
    if not os.path.exists(src):
        return
    so = os.path.join(dest, "edge", "_cparse" + sysconfig.get_config_var("EXT_SUFFIX"))
    cc = shlex.split(sysconfig.get_config_var("CC")) + shlex.split(sysconfig.get_config_var("CFLAGS"))
    subprocess.run([*cc, "-fPIC", "-shared", "-I" + sysconfig.get_paths()["include"], src, "-o", so], check=True)


def log(msg: str) -> None:
    print(f"  [uplink {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bridge_lines(proxy_port: int) -> list[str]:
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
            log(f"{self.kind}: {self.anomaly or 'error'}: logs kept in {dest}")
        self.tail.close()
        try:
            if self.proxy is not None:
                self.proxy.stop()
        finally:
            self.wd.cleanup()


class Edgeferry(Pipeline):
    kind = "edgeferry"

    def __init__(self, tag: str, *, sync: str = "full", extra: tuple[str, ...] = (),
                 src: str | None = None) -> None:
        super().__init__(tag)
        # src: a directory holding exported packages (export()) the gateway and ingest run
        # from (Workdir.proc makes it their cwd)
        self.src = src
        self.env = {"PYTHONPATH": src} if src else None
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
            "--sink", f"jsonl:{self.sink}", "--client-id", "bench-ingest"],
            env=self.env).start()
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
        self.gateway: Proc = self.wd.proc("gateway", self.gateway_argv, env=self.env).start()
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
        return {"gateway": self.gateway.pid, "edge_broker": pid_of(self.edge),
                "cloud_broker": pid_of(self.cloud), "sink": self.ingest.pid,
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
        self.edge = self.wd.broker("edge", "edge", extra=bridge_lines(self.proxy.port))
        self.start_edge()

    def start_edge(self, *, wait_bridge: bool = True) -> None:
        mark = self.cloud.mark()
        self.edge.start()
        if wait_bridge:
            self.cloud.wait_for_log(f" as {BRIDGE_ID} ", 30, since=mark)

    def forwarder_pid(self) -> int:
        return pid_of(self.edge)

    def pids(self) -> dict[str, int]:
        return {"edge_broker": pid_of(self.edge), "cloud_broker": pid_of(self.cloud),
                "sink": self.sinkp.pid, "bench_proxy_and_poller": os.getpid()}


PIPELINES = {"edgeferry": Edgeferry, "bridge": Bridge}


# gateway settings compared in 5 (kill -9) and 7 (flash wear): name -> (--sync, extra flags)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "full": ("full", ()),  # the defaults: --sync full --commit-interval 200ms
    "normal": ("normal", ()),
    "full-ci50": ("full", ("--commit-interval", "50ms")),
}
