"""Bytes on the cloud link (issue 10): cellular links are paid by the byte.

Counts everything the proxy on the cloud link forwards, both ways (MQTT, and TLS
records when on; not TCP/IP headers), per payload byte delivered at the sink:

    edgeferry:  publisher -> edge mosquitto -> gateway -> proxy -> cloud mosquitto -> ingest
    bridge:     publisher -> edge mosquitto (bridge) --> proxy -> cloud mosquitto -> bench sink

on fleet-like JSON telemetry (about 150 bytes: device, stream, value, unit, time,
battery), for edgeferry without and with zstd and the Mosquitto bridge, each without
and with TLS (a client certificate; the cloud broker's TLS listener is the one behind
the proxy, the sinks use a plaintext listener of their own on the cloud side). Then the
idle bytes per day at the default keepalive (and at 60 s), and the uplink with the AWS
IoT Core profile's limits enforced locally (128 KB, 100 publishes/s, 100 in flight):
live throughput and the drain of a backlog.

    .venv/bin/python -m bench --only wire [--quick]
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench._uplink_pipelines import BRIDGE_ID, bridge_lines, log
from bench._util import PY, SinkTail, Workdir, count_run, run_loadgen, run_scenarios, wait_line, wait_until
from edge.mqtt import MQTTClient
from edgeferry.procs import Broker, free_port
from firmware_sim.chaos_thread import ThreadedChaosProxy

NAME = "wire"
__all__ = ["run", "summary"]

STREAMS = (("temperature", "C", 21.0), ("humidity", "%", 45.0), ("pressure", "hPa", 1013.0),
           ("co2", "ppm", 600.0), ("voltage", "V", 3.7), ("door", "", 0.0))


def telemetry(run: str, n: int, devices: int, rng: random.Random) -> tuple[str, bytes]:
    """One fleet-like reading (about 150 bytes of JSON) and its topic."""
    d = n % devices
    stream, unit, base = STREAMS[(n // devices) % len(STREAMS)]
    value = round(base + rng.uniform(-2, 2), 2) if stream != "door" else rng.choice((0, 1))
    t = 1796160000.0 + n * 0.05
    ms = int(t * 1000) % 1000
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"
    body = (f'{{"run":"{run}","n":{n},"device":"dev-{d:04d}","stream":"{stream}",'
            f'"value":{value},"unit":"{unit}","time":"{stamp}","battery":{round(3.6 + rng.random() / 5, 3)}}}')
    return f"dt/dev-{d:04d}/{stream}", body.encode()


async def _publish(url: str, run: str, count: int, devices: int = 20) -> int:
    """Publish ``count`` readings QoS 1 (a window of 500); return the payload bytes."""
    rng = random.Random(7)
    total = 0
    async with MQTTClient(url, f"wire-pub-{run}", max_inflight=500) as c:
        for n in range(count):
            topic, payload = telemetry(run, n, devices, rng)
            total += len(payload)
            await c.publish_nowait(topic, payload, 1)
        await c.drain()
    return total


class _Certs:
    """A CA, the cloud broker's certificate (for 127.0.0.1) and a client certificate."""

    def __init__(self, d: Path) -> None:
        from tests.certs import CA, tls_dir

        self.dir = tls_dir(d)
        ca = CA("bench CA")
        self.ca = ca.write_ca(self.dir / "ca.pem")
        self.server = ca.issue("cloud", server=True, names=("127.0.0.1",)).write(
            self.dir / "server.pem", self.dir / "server.key", key_mode=0o644)
        self.client = ca.issue("bench").write(self.dir / "client.pem", self.dir / "client.key")

    def listener(self, port: int) -> list[str]:
        return [f"listener {port} 127.0.0.1", f"cafile {self.ca}", f"certfile {self.server[0]}",
                f"keyfile {self.server[1]}", "require_certificate true"]


class _Link:
    """The cloud broker, the proxy in front of it (the counted link), the edge broker and
    the sink of one pipeline, in one temp dir."""

    def __init__(self, kind: str, tls: bool, gateway_extra: tuple[str, ...] = (),
                 bridge_extra: tuple[str, ...] = ()) -> None:
        self.kind, self.tls = kind, tls
        self.wd = Workdir(f"efbench-wire-{kind}-")
        self.sink = self.wd / "sink.jsonl"
        self.certs = _Certs(self.wd.path) if tls else None
        self.tls_port = free_port()
        extra = self.certs.listener(self.tls_port) if self.certs else []
        self.cloud: Broker = self.wd.broker("cloud", "cloud", extra=extra).start()
        target = self.tls_port if tls else self.cloud.port
        self.proxy = ThreadedChaosProxy("127.0.0.1", target).start()
        if kind == "bridge":
            self.sinkp = self.wd.proc("sink", [
                PY, "-m", "bench.bridge_sink", "--cloud", self.cloud.url, "--sink", str(self.sink),
                "--client-id", "bench-bridge-sink", "--filter", "dt/#"]).start()
            wait_line(self.sinkp, "sink ready")
            lines = bridge_lines(self.proxy.port) + list(bridge_extra)
            if self.certs:
                c = self.certs
                lines += [f"bridge_cafile {c.ca}", f"bridge_certfile {c.client[0]}",
                          f"bridge_keyfile {c.client[1]}", "bridge_insecure false"]
            self.edge = self.wd.broker("edge", "edge", extra=lines)
            mark = self.cloud.mark()
            self.edge.start()
            self.cloud.wait_for_log(f" as {BRIDGE_ID} ", 30, since=mark)
        else:
            self.edge = self.wd.broker("edge", "edge").start()
            self.sinkp = self.wd.proc("ingest", [
                PY, "-m", "edgeferry", "ingest", "run", "--cloud", self.cloud.url,
                "--sink", f"jsonl:{self.sink}", "--client-id", "bench-ingest"]).start()
            wait_line(self.sinkp, "ingest ready")
            scheme = "mqtts" if tls else "mqtt"
            tls_args: list[str] = []
            if self.certs:
                tls_args = ["--ca-file", self.certs.ca, "--cert-file", self.certs.client[0],
                            "--key-file", self.certs.client[1]]
            self.store = self.wd / "store.db"
            self.gateway = self.wd.proc("gateway", [
                PY, "-m", "edgeferry", "gateway", "run", "--local", self.edge.url,
                "--cloud", f"{scheme}://127.0.0.1:{self.proxy.port}", "--store", str(self.store),
                "--node-id", "bench", "--uplink", "dt/#", *tls_args, *gateway_extra]).start()
            wait_line(self.gateway, "gateway ready", timeout=30)
            wait_until(lambda: (self.status() or {}).get("link", {}).get("cloud") == "up", 30,
                       "the gateway's cloud link up")

    def status(self) -> dict[str, Any] | None:
        from gateway.health import query_status

        return query_status(self.store)

    def wire_bytes(self) -> tuple[int, int]:
        p = self.proxy.proxy
        return p.bytes_up, p.bytes_down

    def settled(self) -> None:
        """Wait until the link is quiet: every confirmation and acknowledgement through."""
        if self.kind == "edgeferry":
            wait_until(lambda: sum(ln["records"] for ln in (self.status() or {"lanes": {"x": {
                "records": 1}}})["lanes"].values()) == 0, 60, "the gateway's store empty")
        last = (-1, -1)
        while self.wire_bytes() != last:  # 1 s without a byte on the link
            last = self.wire_bytes()
            threading.Event().wait(1.0)

    def close(self) -> None:
        try:
            self.proxy.stop()
        finally:
            self.wd.cleanup()


def per_payload_byte(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": n}
    variants = [("edgeferry", False, ()), ("edgeferry-zstd", False, ("--compress", "zstd")),
                ("bridge", False, ()), ("edgeferry-tls", True, ()),
                ("edgeferry-zstd-tls", True, ("--compress", "zstd")), ("bridge-tls", True, ())]
    for i, (name, tls, extra) in enumerate(variants):
        kind = "bridge" if name.startswith("bridge") else "edgeferry"
        link = _Link(kind, tls, gateway_extra=extra)
        try:
            up0, down0 = link.wire_bytes()
            run = f"w{i}"  # run ids of one length: the same payload sizes everywhere
            payload = asyncio.run(_publish(link.edge.url, run, n))
            SinkTail(link.sink).wait(n, timeout=300, quiet=15)
            link.settled()
            up1, down1 = link.wire_bytes()
            c = count_run(link.sink, run, n)
            wire = (up1 - up0) + (down1 - down0)
            row = {"payload_bytes": payload, "avg_payload": round(payload / n, 1),
                   "wire_up": up1 - up0, "wire_down": down1 - down0,
                   "wire_per_payload_byte": round(wire / payload, 3),
                   "connect_bytes": up0 + down0, **c}
            out[name] = row
            log(f"wire {name}: {row}")
        finally:
            link.close()
    return out


def idle(seconds: float) -> dict[str, Any]:
    """Idle link: bytes over ``seconds`` with nothing to send, scaled to a day."""
    out: dict[str, Any] = {"seconds": seconds}
    for name, kind, extra in (("edgeferry-keepalive-10s", "edgeferry", ()),
                              ("edgeferry-keepalive-60s", "edgeferry", ("--keepalive", "60s")),
                              ("bridge-keepalive-60s", "bridge", ())):
        for tls in (False, True):
            link = _Link(kind, tls, gateway_extra=extra)
            try:
                link.settled()
                up0, down0 = link.wire_bytes()
                threading.Event().wait(seconds)  # the idle time measured
                up1, down1 = link.wire_bytes()
                per_s = ((up1 - up0) + (down1 - down0)) / seconds
                key = f"{name}{'-tls' if tls else ''}"
                out[key] = {"bytes": (up1 - up0) + (down1 - down0),
                            "bytes_per_day": int(per_s * 86400)}
                log(f"idle {key}: {out[key]}")
            finally:
                link.close()
    return out


def _cloud_is(link: _Link, state: str) -> bool:
    return bool((link.status() or {}).get("link", {}).get("cloud") == state)


def _stored_at_least(link: _Link, n: int) -> bool:
    return bool((link.status() or {"counters": {"stored": 0}})["counters"]["stored"] >= n)


def aws_profile(n: int) -> dict[str, Any]:
    """The uplink with the aws-iot profile's limits enforced locally, against generic:
    live throughput, and the drain of an n-record backlog built while the link was cut."""
    out: dict[str, Any] = {"messages": n, "size": 100}
    for name, extra in (("generic", ()), ("aws-iot", ("--cloud-profile", "aws-iot"))):
        row: dict[str, Any] = {}
        link = _Link("edgeferry", False, gateway_extra=extra)
        try:
            t0 = time.monotonic()
            lg = run_loadgen(link.edge.url, n, f"live{name.replace('-', '')}")
            w = SinkTail(link.sink).wait(n, timeout=600, quiet=15)
            row["live_msg_s"] = round(n / (w["last"] - t0)) if w["last"] else None
            row["loadgen_msg_s"] = lg["rate"]
            link.proxy.cut()
            wait_until(partial(_cloud_is, link, "down"), 30, "link down")
            run = f"drain{name.replace('-', '')}"
            run_loadgen(link.edge.url, n, run)
            wait_until(partial(_stored_at_least, link, 2 * n), 120, "backlog")
            tail = SinkTail(link.sink)
            base = tail.poll()
            t_up = time.monotonic()
            link.proxy.up()
            w = tail.wait(base + n, timeout=600, quiet=15)
            st = link.status() or {}
            row["drain_s"] = round(w["last"] - t_up, 2) if w["last"] else None
            row["drain_msg_s"] = round(n / (w["last"] - t_up)) if w["last"] else None
            row["frames"] = st.get("counters", {}).get("frames")
            row["publish_wait_s"] = st.get("cloud_limits", {}).get("publish_wait_s")
            row.update(count_run(link.sink, run, n))
            out[name] = row
            log(f"aws profile {name}: {row}")
        finally:
            link.close()
    return out


def run(quick: bool) -> dict[str, Any]:
    n, idle_s, drain_n = (20000, 20.0, 20000) if quick else (20000, 60.0, 100000)
    return {"quick": quick, **run_scenarios((
        ("per_payload_byte", lambda: per_payload_byte(n)),
        ("idle", lambda: idle(idle_s)),
        ("aws_profile", lambda: aws_profile(drain_n)),
    ), log)}


def summary(res: dict[str, Any]) -> str:
    lines = []
    ppb = res.get("per_payload_byte", {})
    if "error" not in ppb:
        lines.append(f"wire bytes per payload byte ({ppb.get('messages')} readings):")
        for k, v in ppb.items():
            if isinstance(v, dict):
                lines.append(f"  {k:<20} {v['wire_per_payload_byte']:>6}  (up {v['wire_up']} B, "
                             f"down {v['wire_down']} B, avg payload {v['avg_payload']} B, "
                             f"lost {v['lost']}, dup {v['duplicated']})")
    for k, v in res.get("idle", {}).items():
        if isinstance(v, dict):
            lines.append(f"  idle {k:<28} {v['bytes_per_day']:>9} B/day")
    for k, v in res.get("aws_profile", {}).items():
        if isinstance(v, dict):
            lines.append(f"  profile {k:<10} live {v.get('live_msg_s')} msg/s, drain "
                         f"{v.get('drain_msg_s')} msg/s ({v.get('drain_s')} s, {v.get('frames')} frames)")
    return "\n".join(lines) or str(res)
