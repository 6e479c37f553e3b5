"""Aggregator: windowed count/min/max/mean/last per device and stream.

Consumes ``dt/{device}/{stream}`` (a bare number or ``{"value": …}``; the field can be
set per stream, and objects without it are skipped and counted) and publishes one
``evt/aggregate/<device>`` event per device, stream and window — a chatty sensor at 10 Hz
with a 60 s window sends 1 event upstream instead of 600.

Windows are tumbling and aligned to the epoch (``window: 60s`` gives 12:00:00–12:01:00),
by event time: the envelope's ``time``, or the arrival time for raw payloads. A window is
published by the first sample of a later window (inside that sample's handler, so a
re-run publishes the same event id), or by a timer once ``grace`` has passed after its
end with no newer sample. A sample older than its key's open window is counted as late
and dropped. On a clean stop the open windows are published with ``partial: true``; a
crash loses the open windows (their samples were already acknowledged).

Example config (``edgeferry service run edge.services.aggregator:service --config FILE``)::

    aggregator:
      window: 60s
      grace: 5s
      streams: [temperature, humidity]   # empty or absent: every stream
      fields: {battery: percent}          # the number's field per stream (default: value)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, Field

from edge.events import Event
from edge.service import Service
from edge.services._common import Duration, Sample, lifecycle_commands, sample_value

__all__ = ["Aggregate", "AggregatorConfig", "service"]


class AggregatorConfig(BaseModel):
    """The ``aggregator:`` section of the YAML file."""

    window: Duration = Field(60.0, gt=0, description="window length (seconds or 30s/5m)")
    grace: Duration = Field(
        5.0, ge=0, description="wait this long after a window's end for late samples"
    )
    streams: list[str] = Field(
        default_factory=list, description="streams to aggregate (empty: all)"
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="per stream, the field that holds the number (default 'value'), "
        "e.g. {battery: percent}",
    )


class Aggregate(BaseModel):
    """One closed window of one device's stream."""

    event_type: ClassVar[str] = "io.edgeferry.aggregate"
    device: str
    stream: str
    window_start: float = Field(description="Unix seconds")
    window_end: float = Field(description="Unix seconds")
    count: int
    min: float
    max: float
    mean: float
    last: float
    partial: bool = Field(False, description="published at shutdown before the window ended")


@dataclass(slots=True)
class _Window:
    start: float
    count: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    total: float = 0.0
    last: float = 0.0

    def add(self, v: float) -> None:
        self.count += 1
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v
        self.total += v
        self.last = v


service = Service(
    "aggregator",
    config=AggregatorConfig,
    description="Windowed count/min/max/mean/last per device and stream.",
)
service.publishes("evt/aggregate/{device}", Aggregate, "one event per device, stream and window")

_windows: dict[tuple[str, str], _Window] = {}


def _aggregate(device: str, stream: str, w: _Window, partial: bool = False) -> Aggregate:
    size = service.config.window
    return Aggregate(
        device=device,
        stream=stream,
        window_start=w.start,
        window_end=w.start + size,
        count=w.count,
        min=w.min,
        max=w.max,
        mean=w.total / w.count,
        last=w.last,
        partial=partial,
    )


@service.on("dt/{device}/{stream}", publishes=[("evt/aggregate/{device}", Aggregate)])
async def sample(device: str, stream: str, value: Sample, event: Event) -> None:
    """Add one sample to its device and stream's window; publish the window it closes."""
    cfg = service.config
    if cfg.streams and stream not in cfg.streams:
        return
    v = sample_value(value, cfg.fields.get(stream, "value"))
    if v is None:  # an object without the number (a door's open/closed): not aggregated
        service.counters["skipped"] = service.counters.get("skipped", 0) + 1
        return
    ts = event.timestamp or time.time()
    start = (ts // cfg.window) * cfg.window
    key = (device, stream)
    w = _windows.get(key)
    if w is not None and start < w.start:
        service.counters["late"] = service.counters.get("late", 0) + 1
        return
    if w is not None and start > w.start:
        del _windows[key]
        _windows[key] = _Window(start)
        await service.publish(
            f"evt/aggregate/{device}", _aggregate(device, stream, w), subject=device
        )
    w = _windows.get(key)
    if w is None:
        w = _windows[key] = _Window(start)
    w.add(v)


@service.every(1.0)
async def _close_idle_windows() -> None:
    cfg = service.config
    now = time.time()
    due = [k for k, w in _windows.items() if w.start + cfg.window + cfg.grace <= now]
    for key in due:
        w = _windows.pop(key)
        await service.publish(
            f"evt/aggregate/{key[0]}", _aggregate(key[0], key[1], w), subject=key[0]
        )


@service.on_start
async def _reset() -> None:
    _windows.clear()
    service.counters["late"] = 0
    service.counters["skipped"] = 0


@service.on_stop
async def _flush_open_windows() -> None:
    for (device, stream), w in list(_windows.items()):
        await service.publish(
            f"evt/aggregate/{device}", _aggregate(device, stream, w, partial=True), subject=device
        )
    _windows.clear()


async def _set_window(seconds: float) -> dict[str, float]:
    """Command ``set_interval`` / desired ``interval``: the window length. Open windows
    are published first (partial), so no window mixes two lengths."""
    await _flush_open_windows()
    service.config.window = seconds
    return {"window": seconds}


lifecycle_commands(service, _set_window)
