"""Health of a running gateway: a status socket beside the store, and Prometheus metrics.

The status socket (``<store>.sock``, a Unix socket) answers every connection with one
JSON document and closes it; ``edgeferry gateway status`` reads it while the gateway
runs and falls back to reading the store file when it does not. Nothing here writes to
the disk, so health costs no flash wear.

Metrics use the Prometheus text exposition format, written directly: the
prometheus-client package alone would add about 8 MB of resident memory to the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["status_socket_path", "serve_status", "query_status", "serve_metrics", "render_metrics",
           "render_ingest_metrics"]

log = logging.getLogger("edgeferry.health")


def status_socket_path(store: str | Path) -> str:
    return str(store) + ".sock"


async def serve_status(store: str | Path, status: Callable[[], dict[str, Any]]) -> asyncio.Server | None:
    path = status_socket_path(store)
    if len(path.encode()) > 100:
        log.warning("status socket path %s is too long for a Unix socket; status works from the store only", path)
        return None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(status()).encode())
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, path)


def query_status(store: str | Path, timeout: float = 2.0) -> dict[str, Any] | None:
    """Ask a running gateway for its status; None when no gateway answers."""
    path = status_socket_path(store)
    if not os.path.exists(path):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
    except OSError:
        return None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return None


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(st: dict[str, Any]) -> str:
    """Prometheus text format for a gateway status document."""
    node = _esc(st["node_id"])
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            labels = {"node": node, **labels}
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {value}")

    lanes = st["lanes"]
    metric("edgeferry_backlog_records", "gauge", "Records waiting in the store, per lane.",
           [({"lane": n}, v["records"]) for n, v in lanes.items()])
    metric("edgeferry_backlog_bytes", "gauge", "Record bytes waiting in the store, per lane.",
           [({"lane": n}, v["bytes"]) for n, v in lanes.items()])
    metric("edgeferry_backlog_oldest_age_seconds", "gauge", "Age of the oldest waiting record, per lane.",
           [({"lane": n}, v["oldest_age_s"] or 0) for n, v in lanes.items()])
    metric("edgeferry_held_messages", "gauge",
           "Messages held unacknowledged at the local broker because a block lane is full.",
           [({"lane": n}, v["held_at_broker"]) for n, v in lanes.items()])
    metric("edgeferry_store_bytes", "gauge", "Record bytes in the store (all lanes).", [({}, st["store_bytes"])])
    metric("edgeferry_store_max_bytes", "gauge", "Store bound.", [({}, st["max_store_bytes"])])
    drops = []
    for key, v in st["drops"].items():
        reason, _, lane = key.partition(":")
        drops.append(({"reason": reason, "detail": lane}, v))
    metric("edgeferry_dropped_total", "counter", "Records dropped, by reason (persisted across restarts).", drops)
    metric("edgeferry_link_up", "gauge", "1 when the link to the broker is up.",
           [({"link": k}, 1 if v == "up" else 0) for k, v in st["link"].items()])
    if "cloud_state" in st:
        metric("edgeferry_link_state", "gauge", "The cloud link's state: up, or why it is down "
               "(tls_unknown_ca, tls_expired, tls_hostname, tls_cert_refused, refused, unreachable, "
               "lost, ...).", [({"link": "cloud", "state": st["cloud_state"]}, 1)])
    metric("edgeferry_offline_seconds", "gauge", "Seconds since the cloud link went down (0 when up).",
           [({}, st["offline_for_s"])])
    for key, v in st["counters"].items():
        metric(f"edgeferry_{key}_total", "counter", f"Gateway counter {key}.", [({}, v)])
    down = st.get("downlink")
    if down:
        metric("edgeferry_downlink_up", "gauge", "1 when the downlink's connection is up (docs/commands.md).",
               [({"link": k}, 1 if down[k] == "up" else 0) for k in ("cloud", "local")])
        metric("edgeferry_downlink_open_commands", "gauge",
               "Commands the gateway holds that its target has not finished.", [({}, down["open_commands"])])
        for key, v in down["counters"].items():
            metric(f"edgeferry_downlink_{key}_total", "counter", f"Downlink counter {key}.", [({}, v)])
    return "\n".join(out) + "\n"


def render_ingest_metrics(st: dict[str, Any]) -> str:
    """Prometheus text format for an ingest status document."""
    out: list[str] = []
    per_lane = {"gaps", "gap_records", "gaps_unknown"}  # below, by node and lane
    for key, v in st["counters"].items():
        if key in per_lane:
            continue
        out.append(f"# HELP edgeferry_ingest_{key}_total Ingest counter {key}.")
        out.append(f"# TYPE edgeferry_ingest_{key}_total counter")
        out.append(f"edgeferry_ingest_{key}_total {v}")
    for name, field, help_ in (
        ("edgeferry_ingest_gaps_total", "notices",
         "Gaps recorded (records a gateway no longer held), per node and lane."),
        ("edgeferry_ingest_gap_records_total", "records", "Records lost in recorded gaps, per node and lane."),
        ("edgeferry_ingest_gaps_unknown_total", "unknown",
         "Gaps whose number of records the gateway could not tell."),
    ):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} counter")
        for g in st.get("gaps", []):
            out.append(f'{name}{{node="{_esc(g["node"])}",lane="{_esc(g["lane"])}"}} {g[field]}')
    return "\n".join(out) + "\n"


async def serve_metrics(host: str, port: int, status: Callable[[], dict[str, Any]],
                        render: Callable[[dict[str, Any]], str] = render_metrics) -> asyncio.Server:
    """A minimal HTTP/1.0 endpoint: GET /metrics."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body = render(status()).encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body = b"not found: try /metrics\n"
                head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
