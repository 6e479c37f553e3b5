"""``sim verify``: compare the manifest (what devices sent) with what ingest stored.

For every device and telemetry stream: ``sent`` (numbers 1..last), ``delivered``
(distinct numbers found in the sink), ``dropped`` (numbers the device's own outbox gave
up: it counted them), ``lost`` (numbers neither delivered nor counted by the device: the
pipeline lost them), ``duplicated`` (rows beyond the first for a number) and ``garbage``
(rows on the device's telemetry topics that are not a readable event). Only ``lost``
is a failure: a device may drop what it cannot hold, the pipeline may not.

Rows are matched to this run by the ``simrun`` attribute of the event; rows of other runs
and other producers are ignored (counted as ``foreign``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from firmware_sim.outbox import SeqRanges

__all__ = ["DeviceResult", "Report", "compare"]


@dataclass
class DeviceResult:
    device: str
    sent: int = 0
    delivered: int = 0
    dropped: int = 0
    dropped_delivered: int = 0  # counted as dropped, arrived anyway (in flight when dropped)
    lost: int = 0
    duplicated: int = 0
    duplicates_sent: int = 0
    garbage: int = 0
    garbage_sent: int = 0
    lost_ranges: dict[str, list[list[int]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "lost_ranges"}
        if self.lost_ranges:
            out["lost_ranges"] = self.lost_ranges
        return out


@dataclass
class Report:
    run: str
    devices: list[DeviceResult]
    total: DeviceResult
    foreign: int = 0
    rows: int = 0

    @property
    def ok(self) -> bool:
        return self.total.lost == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "ok": self.ok,
            "rows": self.rows,
            "foreign": self.foreign,
            "total": self.total.to_json(),
            "devices": [d.to_json() for d in self.devices],
        }


def _intersect(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    """The intersection of two sorted lists of disjoint closed ranges."""
    out: list[list[int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append([lo, hi])
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    """``a`` minus ``b`` (sorted lists of disjoint closed ranges)."""
    out: list[list[int]] = []
    j = 0
    for lo, hi in a:
        cur = lo
        while j < len(b) and b[j][1] < cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] <= hi:
            if b[k][0] > cur:
                out.append([cur, b[k][0] - 1])
            cur = max(cur, b[k][1] + 1)
            k += 1
        if cur <= hi:
            out.append([cur, hi])
    return out


def _count(ranges: list[list[int]]) -> int:
    return sum(hi - lo + 1 for lo, hi in ranges)


def compare(manifest: dict[str, Any], rows: Iterable[dict[str, Any]]) -> Report:
    """Count sent / delivered / dropped / lost / duplicated per device from sink rows
    (dicts with at least ``topic`` and ``payload``; ``encoding: base64`` for binary).
    ``rows`` may be any iterable, read once: memory grows with gaps, not with rows."""
    run = manifest["run"]
    devices: dict[str, Any] = manifest["devices"]
    seen: dict[tuple[str, str], SeqRanges] = {}
    dups: dict[tuple[str, str], int] = {}
    garbage: dict[str, int] = {}
    foreign = 0
    n_rows = 0
    for row in rows:
        n_rows += 1
        topic = str(row.get("topic", ""))
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != "dt" or parts[1] not in devices:
            foreign += 1
            continue
        device = parts[1]
        payload = row.get("payload", "")
        if row.get("encoding") == "base64":
            garbage[device] = garbage.get(device, 0) + 1  # not UTF-8: cannot be an event
            continue
        try:
            ev = orjson.loads(payload if isinstance(payload, bytes | str) else b"")
        except orjson.JSONDecodeError:
            garbage[device] = garbage.get(device, 0) + 1
            continue
        data = ev.get("data") if isinstance(ev, dict) else None
        seq = data.get("seq") if isinstance(data, dict) else None
        if not isinstance(ev, dict) or not isinstance(seq, int) or isinstance(seq, bool):
            garbage[device] = garbage.get(device, 0) + 1
            continue
        if ev.get("simrun") != run:
            foreign += 1
            continue
        key = (device, parts[2])
        got = seen.get(key)
        if got is None:
            got = seen[key] = SeqRanges()
        if not got.add(seq):
            dups[key] = dups.get(key, 0) + 1

    results = []
    total = DeviceResult("total")
    for name in sorted(devices):
        rec = devices[name]
        r = DeviceResult(
            name,
            duplicates_sent=int(rec.get("duplicates_sent", 0)),
            garbage_sent=int(rec.get("garbage_sent", 0)),
            garbage=garbage.get(name, 0),
        )
        for stream, s in rec.get("streams", {}).items():
            first, last = int(s.get("first", 0)), int(s.get("last", 0))
            sent = [[first, last]] if last else []
            dropped = _intersect(SeqRanges(s.get("dropped", [])).r, sent)
            got = seen.get((name, stream))
            delivered = _intersect(got.r, sent) if got is not None else []
            missing = _subtract(_subtract(sent, delivered), dropped)
            r.sent += _count(sent)
            r.delivered += _count(delivered)
            r.dropped += _count(dropped)
            r.dropped_delivered += _count(_intersect(delivered, dropped))
            r.duplicated += dups.get((name, stream), 0)
            r.lost += _count(missing)
            if missing:
                r.lost_ranges[stream] = missing
        results.append(r)
        for attr in (
            "sent",
            "delivered",
            "dropped",
            "dropped_delivered",
            "lost",
            "duplicated",
            "duplicates_sent",
            "garbage",
            "garbage_sent",
        ):
            setattr(total, attr, getattr(total, attr) + getattr(r, attr))
    return Report(run, results, total, foreign, n_rows)
