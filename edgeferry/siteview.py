"""The operator's view of one running site: what ``edgeferry status``, ``edgeferry top``
and the demo's dashboard show (one collector, one snapshot format).

Where each figure comes from:

* the gateway's status socket (``<store>.sock``, gateway/health.py): the cloud link,
  backlog per lane, drops by reason and the counters the rates are computed from
  (``received``: messages taken from the local broker; ``uplinked_records``: records
  confirmed by the cloud side);
* the gateway's downlink store (``<store>.downlink``, read only): the commands the site
  holds and has not finished;
* the local broker (a watcher connection, QoS 0, read only): the retained
  ``state/<id>`` of every device and service (online/offline), services' retained
  ``state/<service>/heartbeat``, alerts (``evt/alert/+``) and command statuses
  (``evt/cmd/+``) as they happen;
* optionally the cloud database (``--sink``, gateway/cloudstate.py): every command of
  the node and its state as the cloud knows it.

A :class:`SiteWatcher` keeps the live part; :meth:`SiteWatcher.snapshot` returns a plain
dict (the ``--json`` of ``edgeferry status``) and keeps a short history for sparklines.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.mqtt import BrokerURL, Message, MQTTClient

__all__ = ["SiteWatcher", "gateway_status", "site_commands"]

log = logging.getLogger("edgeferry.siteview")

HISTORY = 120  # snapshots kept for sparklines
_FINAL = ("succeeded", "failed", "rejected", "expired")


def gateway_status(store: Path | None) -> dict[str, Any] | None:
    """The running gateway's status document, or None when none answers."""
    if store is None:
        return None
    from gateway.health import query_status

    return query_status(store, timeout=1.0)


def site_commands(store: Path | None) -> list[dict[str, Any]]:
    """Commands the gateway holds and its target has not finished (its downlink store,
    opened read only; empty when there is none)."""
    if store is None:
        return []
    path = store.with_name(store.name + ".downlink")
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            marks = ",".join("?" * len(_FINAL))
            rows = db.execute(f"SELECT id, target, name, state, received FROM commands "  # noqa: S608
                              f"WHERE state NOT IN ({marks}) ORDER BY received", _FINAL).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []
    return [{"id": r[0], "target": r[1], "name": r[2], "state": r[3], "received": r[4]} for r in rows]


@dataclass
class _Client:
    """A device or service seen on ``state/<id>``."""

    name: str
    kind: str = "client"  # device, service or client
    online: bool = False
    since: float = 0.0  # when we saw it change (or first saw it)
    heartbeat: float | None = None  # wall time of its last heartbeat
    stats: dict[str, Any] = field(default_factory=dict)


class SiteWatcher:
    """Watches one site: call :meth:`run` as a task, :meth:`snapshot` whenever a view
    is wanted. ``local`` (the local broker URL) or ``store`` (the gateway's store) may
    be None; the view then lacks that part. ``sink`` adds the cloud's command states."""

    def __init__(self, local: str | BrokerURL | None, store: Path | None, sink: str | None = None,
                 node: str | None = None) -> None:
        self.local = local
        self.store = store
        self.sink = sink
        self.node = node
        self.clients: dict[str, _Client] = {}
        self.alerts: collections.deque[dict[str, Any]] = collections.deque(maxlen=8)
        self.alerts_total = 0
        self.alerts_firing: set[tuple[str, str]] = set()
        self.statuses: dict[str, dict[str, Any]] = {}  # command id -> last status seen locally
        self.connected = asyncio.Event()
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self._prev: tuple[float, dict[str, int]] | None = None
        self._link: tuple[str, float] | None = None  # (state, since) as observed
        self._cloud: Any = None

    # ------------------------------------------------------------ the broker side

    async def run(self) -> None:
        """Follow the local broker until cancelled; reconnect every second when it is away."""
        if self.local is None:
            return
        while True:
            client = MQTTClient(self.local, f"edgeferry-view-{os.getpid()}-{time.monotonic_ns() % 10**6}",
                                on_message=self._on_message, keepalive=15, connect_timeout=5)
            try:
                await client.connect()
                await client.subscribe([("state/#", 0), ("evt/alert/+", 0), ("evt/cmd/+", 0)])
                self.connected.set()
                await client.closed
            except (OSError, ConnectionError, TimeoutError) as e:
                log.debug("site view: local broker: %s", e)
            except Exception as e:  # noqa: BLE001 - edge errors: keep watching
                log.debug("site view: local broker: %s", e)
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await client.close()
            await asyncio.sleep(1.0)

    def _client(self, name: str) -> _Client:
        c = self.clients.get(name)
        if c is None:
            c = self.clients[name] = _Client(name, since=time.time())
        return c

    def _on_message(self, m: Message) -> None:
        try:
            parts = m.topic.split("/")
            if parts[0] == "state" and len(parts) == 2:
                self._state(parts[1], m.payload)
            elif parts[0] == "state" and len(parts) == 3 and parts[2] == "heartbeat":
                self._heartbeat(parts[1], m.payload)
            elif parts[:2] == ["evt", "alert"]:
                self._alert(m.payload)
            elif parts[:2] == ["evt", "cmd"]:
                self._status(m.payload)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.debug("site view: cannot read %s: %s", m.topic, e)

    def _state(self, name: str, payload: bytes) -> None:
        c = self._client(name)
        text = payload.decode("utf-8", "replace").strip()
        online = text == "online"
        if text.startswith("{"):
            doc = json.loads(text)
            online = doc.get("state") == "online"
            if "firmware" in doc:
                c.kind = "device"
        if online != c.online:
            c.online, c.since = online, time.time()

    def _heartbeat(self, name: str, payload: bytes) -> None:
        c = self._client(name)
        c.kind = "service"
        doc = json.loads(payload)
        data = doc.get("data") if isinstance(doc, dict) else None
        c.stats = data if isinstance(data, dict) else {}
        c.heartbeat = time.time()

    def _alert(self, payload: bytes) -> None:
        doc = json.loads(payload)
        data = doc.get("data", doc)
        key = (str(data.get("rule")), str(data.get("device")))
        if data.get("state") == "firing":
            self.alerts_total += 1
            self.alerts_firing.add(key)
        else:
            self.alerts_firing.discard(key)
        self.alerts.append({"t": time.time(), "rule": key[0], "device": key[1], "state": data.get("state"),
                            "condition": data.get("condition"), "value": data.get("value")})

    def _status(self, payload: bytes) -> None:
        doc = json.loads(payload)
        data = doc.get("data", doc)
        cid = data.get("id")
        if isinstance(cid, str) and cid:
            self.statuses[cid] = {"id": cid, "status": data.get("status"), "by": data.get("by"), "t": time.time()}

    # ------------------------------------------------------------ snapshots

    def _cloud_commands(self) -> list[dict[str, Any]]:
        if not self.sink or not self.node:
            return []
        try:
            if self._cloud is None:
                from gateway.cloudstate import CloudState

                self._cloud = CloudState.for_sink(self.sink)
            rows: list[dict[str, Any]] = self._cloud.commands(self.node, 20)
        except (sqlite3.Error, OSError, ValueError) as e:
            log.debug("site view: cloud state: %s", e)
            return []
        return [{k: r.get(k) for k in ("id", "target", "name", "state", "created", "delivered_at",
                                         "finished_at", "reply", "error")} for r in rows]

    def _cloud_shadows(self) -> list[dict[str, Any]]:
        """Things with a desired document, and whether their report matches it yet."""
        if self._cloud is None:
            return []
        from edge.downlink import delta

        out = []
        try:
            for thing, version, doc in self._cloud.desired_for(self.node)[:10]:
                row = self._cloud.shadow(self.node, thing) or {}
                reported = row.get("reported")
                in_sync = isinstance(reported, dict) and not delta(doc, reported)
                out.append({"thing": thing, "desired_version": version, "desired": doc, "reported": reported,
                            "reported_version": row.get("reported_version"),
                            "state": "in sync" if in_sync else "pending"})
        except (sqlite3.Error, OSError, ValueError) as e:
            log.debug("site view: cloud shadows: %s", e)
        return out

    def close(self) -> None:
        if self._cloud is not None:
            self._cloud.close()
            self._cloud = None

    def snapshot(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """One view of the site now; rates are over the time since the last snapshot."""
        now = time.time()
        st = gateway_status(self.store)
        snap: dict[str, Any] = {"t": round(now, 3), "node": self.node, "gateway": st is not None}
        counters = (st or {}).get("counters", {})
        local_rate = uplink_rate = 0.0
        if st is not None:
            cur = {"received": int(counters.get("received", 0)),
                   "uplinked": int(counters.get("uplinked_records", 0))}
            if self._prev is not None and now > self._prev[0]:
                dt = now - self._prev[0]
                local_rate = max(0.0, (cur["received"] - self._prev[1]["received"]) / dt)
                uplink_rate = max(0.0, (cur["uplinked"] - self._prev[1]["uplinked"]) / dt)
            self._prev = (now, cur)
            snap["node"] = snap["node"] or st.get("node_id")
        snap["rates"] = {"local": round(local_rate, 1), "uplink": round(uplink_rate, 1)}
        snap["link"] = self._link_view(st, now)
        lanes = {}
        for name, lane in ((st or {}).get("lanes") or {}).items():
            records = int(lane.get("records", 0))
            drain = None
            if records == 0:
                drain = 0.0
            elif snap["link"]["state"] == "up" and uplink_rate > 0:
                drain = round(records / uplink_rate, 1)
            lanes[name] = {"records": records, "bytes": int(lane.get("bytes", 0)),
                           "oldest_age_s": lane.get("oldest_age_s"), "drain_s": drain,
                           "policy": lane.get("policy")}
        snap["lanes"] = lanes
        drops = dict((st or {}).get("drops") or {})
        for k, v in ((st or {}).get("rejected") or {}).items():
            drops[f"rejected:{k}"] = v
        snap["drops"] = {k: v for k, v in sorted(drops.items()) if v}
        snap["downlink"] = (st or {}).get("downlink")
        devices = [c for c in self.clients.values() if c.kind == "device"]
        snap["devices"] = {"online": sum(c.online for c in devices), "known": len(devices),
                           "offline": sorted(c.name for c in devices if not c.online)[:50],
                           "list": [{"name": c.name, "online": c.online, "since": round(c.since, 3)}
                                    for c in sorted(devices, key=lambda c: c.name)[:500]]}
        snap["services"] = [
            {"name": c.name, "online": c.online, "since": round(c.since, 3),
             "heartbeat_age_s": None if c.heartbeat is None else round(now - c.heartbeat, 1),
             "handled": c.stats.get("handled", c.stats.get("processed"))}
            for c in sorted(self.clients.values(), key=lambda c: c.name) if c.kind != "device"]
        snap["alerts"] = {"raised": self.alerts_total, "firing": len(self.alerts_firing),
                          "recent": list(self.alerts)}
        snap["pending_commands"] = site_commands(self.store)
        cloud = self._cloud_commands()
        snap["shadows"] = self._cloud_shadows()
        if cloud:
            for c in cloud:
                seen = self.statuses.get(c["id"])
                c["site_status"] = seen["status"] if seen else None
            snap["commands"] = cloud
        else:
            snap["commands"] = [{"id": s["id"], "target": s["by"], "name": None, "state": s["status"]}
                                for s in list(self.statuses.values())[-10:]]
        if extra:
            snap.update(extra)
        self.history.append(snap)
        return snap

    def _link_view(self, st: dict[str, Any] | None, now: float) -> dict[str, Any]:
        """The cloud link's state and how long it has been in it: the gateway's
        ``offline_since`` while down; while up, since this view saw it come up (unknown
        when it was up from the first look)."""
        if st is None:
            return {"state": "unknown", "for_s": None, "offline_for_s": None}
        state = st.get("link", {}).get("cloud", "unknown")
        if self._link is None or self._link[0] != state:
            first = self._link is None
            self._link = (state, -1.0 if first else now)
        offline_for = float(st.get("offline_for_s") or 0.0)
        if state != "up":
            for_s: float | None = offline_for
        elif st.get("online_for_s"):  # the gateway says since when
            for_s = float(st["online_for_s"])
        else:
            for_s = None if self._link[1] < 0 else now - self._link[1]
        return {"state": state, "why": st.get("cloud_state"),
                "for_s": None if for_s is None else round(for_s, 1), "offline_for_s": offline_for}
