"""Shared helpers for the simulator tests (this module holds no tests).

:class:`Collector` is a subscriber on a real broker that keeps every message it gets
(acknowledging QoS 1) and lets a test wait for a condition on them; :func:`until` waits
for a condition on live counters, woken by every message the collector receives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from edge.mqtt import Message, MQTTClient
from firmware_sim import Fleet, Profile, load_profile


class Got:
    __slots__ = ("topic", "payload", "retain", "at")

    def __init__(self, topic: str, payload: bytes, retain: bool, at: float) -> None:
        self.topic, self.payload, self.retain, self.at = topic, payload, retain, at

    def json(self) -> Any:
        return orjson.loads(self.payload)


class Collector:
    """``async with Collector(url, ["dt/#"]) as col: await col.wait(lambda: ..., 5, "what")``."""

    def __init__(self, url: str, filters: list[str], client_id: str = "sim-test-collector") -> None:
        self.url = url
        self.filters = filters
        self.client_id = client_id
        self.got: list[Got] = []
        self.markers: list[bytes] = []
        self.changed = asyncio.Event()
        self.client: MQTTClient | None = None

    def _on(self, m: Message) -> None:
        if m.topic.startswith("_sync/"):
            self.markers.append(m.payload)
        else:
            self.got.append(Got(m.topic, m.payload, m.retain, time.time()))
        if m.qos and self.client is not None:
            self.client.ack(m.pid)
        self.changed.set()

    async def __aenter__(self) -> Collector:
        self.client = MQTTClient(self.url, self.client_id, on_message=self._on, max_inflight=1000)
        await self.client.connect()
        await self.client.subscribe(
            [(f, 1) for f in self.filters] + [(f"_sync/{self.client_id}", 1)]
        )
        return self

    async def sync(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until everything the broker accepted before now has reached us: Mosquitto
        handles packets in order, so a marker we publish now arrives after all of it."""
        assert self.client is not None
        topic = f"_sync/{self.client_id}"
        marker = str(time.monotonic_ns()).encode()
        await self.client.publish(topic, marker, 1)
        await self.wait(lambda: marker in self.markers, timeout, "the sync marker")

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        if exc[0] is None:
            await self.sync()
        await self.client.close()

    async def wait(
        self,
        predicate: Callable[[], object],
        timeout: float,  # noqa: ASYNC109
        what: str,
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None

    def on(self, topic: str) -> list[Got]:
        return [g for g in self.got if g.topic == topic]

    def telemetry(self, device: str, stream: str) -> list[dict[str, Any]]:
        """Readable telemetry events of one device and stream, in arrival order."""
        out = []
        for g in self.on(f"dt/{device}/{stream}"):
            try:
                ev = g.json()
            except orjson.JSONDecodeError:
                continue
            if isinstance(ev, dict) and isinstance(ev.get("data"), dict):
                out.append(ev)
        return out

    def seqs(self, device: str, stream: str) -> list[int]:
        return [ev["data"]["seq"] for ev in self.telemetry(device, stream)]


def profile(**kw: Any) -> Profile:
    """A fast profile for tests: short reconnect backoff unless given."""
    kw.setdefault("reconnect", {"initial": 0.05, "cap": 0.3})
    kw.setdefault("keepalive", 5)
    return load_profile(None, **kw)


async def until(
    predicate: Callable[[], object],
    timeout: float,  # noqa: ASYNC109
    what: str,
    step: float = 0.01,
) -> None:
    """Wait for a condition on live counters with a deadline (no event exists for them)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(step)


def delivered_or_dropped(
    col: Collector, fleet: Fleet, device: str, stream: str
) -> tuple[set[int], set[int], int]:
    """(delivered seqs, dropped seqs, last seq) of one device stream after a run."""
    rec = fleet.manifest()["devices"][device]["streams"][stream]
    dropped = {n for lo, hi in rec["dropped"] for n in range(lo, hi + 1)}
    return set(col.seqs(device, stream)), dropped, rec["last"]
