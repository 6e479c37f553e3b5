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

from dataclasses import dataclass, field
from typing import Any

import orjson

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


def _ranges(nums: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for n in nums:
        if out and out[-1][1] + 1 == n:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def compare(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> Report:
    """Count sent / delivered / dropped / lost / duplicated per device from sink rows
    (dicts with at least ``topic`` and ``payload``; ``encoding: base64`` for binary)."""
    run = manifest["run"]
    devices: dict[str, Any] = manifest["devices"]
    seen: dict[tuple[str, str], dict[int, int]] = {}
    garbage: dict[str, int] = {}
    foreign = 0
    for row in rows:
        topic = str(row.get("topic", ""))
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != "dt" or parts[1] not in devices:
            foreign += 1
            continue
        device, stream = parts[1], parts[2]
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
        counts = seen.setdefault((device, stream), {})
        counts[seq] = counts.get(seq, 0) + 1

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
            dropped = [(int(lo), int(hi)) for lo, hi in s.get("dropped", [])]
            counts = seen.get((name, stream), {})
            r.sent += max(0, last - first + 1) if last else 0
            r.duplicated += sum(c - 1 for c in counts.values())
            r.dropped += sum(hi - lo + 1 for lo, hi in dropped)
            missing = []
            delivered = 0
            for n in range(first, last + 1) if last else ():
                if n in counts:
                    delivered += 1
                    if dropped and any(lo <= n <= hi for lo, hi in dropped):
                        r.dropped_delivered += 1
                elif not (dropped and any(lo <= n <= hi for lo, hi in dropped)):
                    missing.append(n)
            r.delivered += delivered
            r.lost += len(missing)
            if missing:
                r.lost_ranges[stream] = _ranges(missing)
        results.append(r)
        for key in (
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
            setattr(total, key, getattr(total, key) + getattr(r, key))
    return Report(run, results, total, foreign, len(rows))
