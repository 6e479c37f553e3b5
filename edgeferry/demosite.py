"""The processes of the demo: one site and its cloud on this machine.

::

    devices (sim) ──> local broker ──> aggregator, rules (services)
                          │
                       gateway (store) ──> chaos link ──> cloud broker ──> ingest (SQLite)

Every child is started from the main thread with ``die_with_parent`` (the kernel kills
it if the demo dies, even by kill -9) in its own session; :meth:`DemoSite.close` stops
them all (SIGTERM to every one first, then a bounded wait each, then SIGKILL) and the
brokers last. Files live under ``data``: ``cloud.db`` (ingest's sink and the cloud's
commands), ``gateway/store.db``, ``manifest.json`` (what the devices sent), ``logs/``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from edgeferry.procs import CLOUD_CONF, EDGE_CONF, Broker, Proc

__all__ = ["DemoSite", "NODE"]

NODE = "demo-site"

_SERVICES_YAML = """\
# written by edgeferry demo: the built-in services' settings
aggregator:
  window: 10s
  grace: 2s
rules:
  rules:
    - name: vibration-high
      stream: vibration
      field: rms
      above: 9
      hysteresis: 2
      min_interval: 20s
      severity: warning
    - name: battery-low
      stream: battery
      field: percent
      below: 72
      min_interval: 5m
      severity: info
"""


class DemoSite:
    def __init__(self, data: Path, devices: int, duration: float, seed: int = 7) -> None:
        self.data = data
        self.logs = data / "logs"
        self.devices = devices
        self.duration = duration
        self.seed = seed
        self.run_id = f"demo-{time.strftime('%Y%m%dT%H%M%S')}"
        self.store = data / "gateway" / "store.db"
        self.sink_path = data / "cloud.db"
        self.sink = f"sqlite:{self.sink_path}"
        self.manifest = data / "manifest.json"
        self.edge: Broker | None = None
        self.cloud: Broker | None = None
        self.proxy: Any = None  # firmware_sim.chaos.ChaosProxy
        self.procs: dict[str, Proc] = {}
        self.fleet_started = 0.0

    # ------------------------------------------------------------------ start

    def start_brokers(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.data / "gateway").mkdir(parents=True, exist_ok=True)
        self.edge = Broker(EDGE_CONF, self.data / "brokers" / "local", name="local", die_with_parent=True).start()
        self.cloud = Broker(CLOUD_CONF, self.data / "brokers" / "cloud", name="cloud", die_with_parent=True).start()

    def _proc(self, name: str, *args: str) -> Proc:
        p = Proc([sys.executable, "-m", "edgeferry", *args], name, self.logs, die_with_parent=True)
        self.procs[name] = p.start()
        return p

    async def _line(self, proc: Proc, regex: str) -> None:
        await asyncio.to_thread(proc.wait_for_line, regex, 30)

    async def start(self, on_change: Any = None) -> None:
        """The chaos link, ingest, the gateway and the two services; returns once each is
        connected (brokers first: :meth:`start_brokers`)."""
        from firmware_sim.chaos import ChaosProxy

        assert self.edge is not None and self.cloud is not None
        self.proxy = ChaosProxy(self.cloud.host, self.cloud.port, seed=self.seed, on_change=on_change)
        await self.proxy.__aenter__()
        ingest = self._proc("ingest", "ingest", "run", "--cloud", self.cloud.url, "--sink", self.sink,
                            "--client-id", "demo-ingest")
        gateway = self._proc("gateway", "gateway", "run", "--local", self.edge.url,
                             "--cloud", f"mqtt://127.0.0.1:{self.proxy.port}", "--store", str(self.store),
                             "--node-id", NODE, "--backoff-max", "1s", "--keepalive", "5s",
                             "--redeliver", "2s")
        conf = self.data / "services.yaml"
        conf.write_text(_SERVICES_YAML)
        services = [self._proc(name, "service", "run", f"edge.services.{name}:service", "--broker", self.edge.url,
                               "--config", str(conf), "--state-dir", str(self.data / "services"),
                               "--heartbeat", "2s")
                    for name in ("aggregator", "rules")]
        await self._line(ingest, "ingest connected")
        await self._line(gateway, r"cloud broker .* connected")
        await self._line(gateway, r"local broker .* connected")
        for s in services:
            await self._line(s, r"service \S+ ready on")

    def start_fleet(self) -> Proc:
        assert self.edge is not None
        self.fleet_started = time.time()
        return self._proc("fleet", "sim", "run", "--broker", self.edge.url, "--devices", str(self.devices),
                          "--duration", f"{self.duration:g}", "--seed", str(self.seed),
                          "--manifest", str(self.manifest), "--run-id", self.run_id, "--no-progress",
                          "--drain-timeout", "10", "--log-level", "warning")

    async def cut(self) -> None:
        await self.proxy.cut()

    async def up(self) -> None:
        await self.proxy.up()

    # ------------------------------------------------------------------ stop

    def pids(self) -> list[int]:
        out = [p.pid for p in self.procs.values() if p.running]
        out += [b.pid for b in (self.edge, self.cloud) if b is not None and b.pid is not None and b.running]
        return out

    async def close(self) -> None:
        """Stop everything, children first, brokers last; never raises."""
        for p in self.procs.values():
            if p.running:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in self.procs.values():
            if p.returncode is None:
                await asyncio.to_thread(p.terminate, 8)
        if self.proxy is not None:
            try:
                await self.proxy.__aexit__(None, None, None)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            self.proxy = None
        for b in (self.edge, self.cloud):
            if b is not None:
                b.close()
