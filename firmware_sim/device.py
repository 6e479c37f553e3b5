"""One simulated device: its own MQTT connection, sensors, outbox, commands and faults.

A device is a state machine driven by loop timers plus one task (its link):

* **ticks** (``loop.call_at``): every ``interval`` seconds, with seeded jitter, the
  device advances its sensors and puts one reading per due stream into its outbox.
  They start when the fleet's start-up ramp lets the device make its first connection
  attempt (it is switched on), and keep running while the link is down, as a
  microcontroller keeps measuring.
* **link** (the task): connects with a last will (``offline`` retained on
  ``state/<device>``), subscribes to ``cmd/<device>/+``, publishes its retained birth
  (``{"state": "online", "firmware": ..., "sensors": [...], "boot": n}``), then sends
  the outbox oldest first with at most ``window`` publishes in flight. Every attempt
  waits for a slot of the fleet's :class:`~firmware_sim.ramp.Ramp` (connections in
  flight, bounded and adapting), held until the birth is acknowledged. A message leaves
  the outbox only on PUBACK. When the connection dies it reconnects with capped,
  jittered exponential backoff and sends again everything still held.
* **faults** (timers from the seeded plan): network drops (abort, no DISCONNECT),
  power loss (abort, outbox lost, boots again later), storms; per-reading garbage and
  duplicates; clock skew and newer-firmware payloads.

Commands (``cmd/<device>/<name>``) and desired state (``shadow/<device>/desired``)
follow the contract of SDK services (firmware_sim/commands.py, docs/commands.md):
statuses on ``evt/cmd/<device>``; an id seen before is not applied again.

Size: one device is one state machine (ticks, faults, power, link, its manifest record)
whose parts share its state; commands live in firmware_sim/commands.py, the outbox in
firmware_sim/outbox.py, what it shares with the fleet in firmware_sim/context.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from functools import partial
from typing import Any

import orjson

from edge.backoff import Backoff
from edge.errors import ConnectError, ConnectionLost
from edge.events import new_id, rfc3339_ms
from edge.mqtt import Message, MQTTClient, Will
from firmware_sim import commands
from firmware_sim._rng import uniform
from firmware_sim.context import DeviceContext
from firmware_sim.faults import DeviceFaults, garbage_payload
from firmware_sim.outbox import Entry, Outbox
from firmware_sim.sensors import Sensors

__all__ = ["Device"]

log = logging.getLogger("edgeferry.sim")

_P_JITTER, _P_DUP, _P_GARBAGE, _P_PHASE = 201, 202, 203, 204
_OFFLINE = b"offline"



class Device:
    """A simulated device; created and run by :class:`~firmware_sim.fleet.Fleet`."""

    __slots__ = (
        "ctx",
        "index",
        "name",
        "faults",
        "sensors",
        "streams",
        "seqs",
        "acked_by_stream",
        "boot",
        "firmware",
        "interval",
        "tick_interval",
        "k",
        "anchor",
        "anchor_k",
        "sim_anchor",
        "last_t",
        "outbox",
        "client",
        "alive",
        "_announced",
        "net_down_until",
        "wake",
        "timer",
        "timers",
        "storm_until",
        "seen",
        "desired_version",
        "counters",
        "state_topic",
        "source",
        "_busy",
        "measuring",
    )

    def __init__(self, ctx: DeviceContext, index: int, name: str, faults: DeviceFaults) -> None:
        p = ctx.profile
        self.ctx = ctx
        self.index = index
        self.name = name
        self.faults = faults
        self.sensors = Sensors(p.seed, index, streams=[s.name for s in p.sensors])
        # (stream, every, topic, type) in the profile's order: the order of reads is fixed
        self.streams = [
            (s.name, s.every, f"dt/{name}/{s.name}", f"io.edgeferry.telemetry.{s.name}")
            for s in p.sensors
        ]
        self.seqs = [0] * len(self.streams)
        self.acked_by_stream = [0] * len(self.streams)
        self.boot = 1
        self.firmware = faults.newer.firmware if faults.newer is not None else p.firmware
        self.interval = p.interval
        self.tick_interval = p.interval
        self.k = 0
        self.anchor = 0.0
        self.anchor_k = 0
        self.sim_anchor = 0.0
        self.last_t = 0.0
        self.outbox = Outbox(p.outbox)
        self.client: MQTTClient | None = None
        self.alive = True
        self._announced = False  # the birth went out on the current connection
        self.net_down_until = 0.0
        self.wake = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None
        self.timers: list[asyncio.TimerHandle] = []
        self.storm_until = 0.0
        # command id -> (status, reply, error), in "flash": it survives reboots
        self.seen: OrderedDict[str, tuple[str, Any, str | None]] = OrderedDict()
        self.desired_version = 0  # in RAM: a reboot applies the retained desired state again
        self.counters = {
            "garbage_sent": 0,
            "duplicates_sent": 0,
            "events_sent": 0,
            "acked": 0,
            "connects": 0,
            "connect_failures": 0,
            "abnormal_disconnects": 0,
            "link_lost": 0,
            "commands_applied": 0,
            "commands_duplicate": 0,
            "commands_rejected": 0,
            "desired_applied": 0,
        }
        self.state_topic = f"state/{name}"
        self.source = f"/{p.site}/devices/{name}"
        self._busy = False  # a reboot or OTA is in progress
        self.measuring = False  # switched on: ticks were started (first connection attempt)

    # ------------------------------------------------------------------ schedule

    def start(self, t0: float) -> None:
        """Join the fleet started at loop time ``t0``: its fault timers run from ``t0``; its
        ticks start when it is switched on (:meth:`_switch_on`), on a grid with a seeded
        phase within one interval, so a fleet does not report in lockstep."""
        loop = asyncio.get_running_loop()
        phase = uniform(self.ctx.profile.seed, self.index, _P_PHASE) * self.interval
        self.anchor = t0 + phase
        self.anchor_k = 0
        self.sim_anchor = phase
        self.last_t = phase
        for at, kind, arg in self.faults.timed:
            self.timers.append(loop.call_at(t0 + at, self._fault, kind, arg))

    def _switch_on(self) -> None:
        """The device is switched on when the start-up ramp lets it make its first
        connection attempt (firmware_sim/ramp.py): its first tick is the next point of
        its grid, and it measures from then on, connected or not. Devices still waiting
        for their turn hold nothing, so a slow ramp does not fill outboxes. Tick ``k``
        counts from the first tick, so the values do not depend on when that was."""
        if self.measuring or not self.alive or self.ctx.stopping:
            return
        self.measuring = True
        loop = asyncio.get_running_loop()
        behind = loop.time() - self.anchor
        if behind > 0:
            self.anchor += math.ceil(behind / self.tick_interval) * self.tick_interval
        self.timer = loop.call_at(self.anchor, self._tick)

    def stop_ticks(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for h in self.timers:
            h.cancel()
        self.timers.clear()

    def _rebase(self, tick_interval: float) -> None:
        """Change the tick period from now on (set_interval, storms)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.sim_anchor = self.last_t
        self.anchor = now
        self.anchor_k = self.k
        self.tick_interval = tick_interval
        if self.timer is not None:
            self.timer.cancel()
            self.timer = loop.call_at(now + tick_interval * 0.01, self._tick)

    def _tick(self) -> None:
        if not self.alive:
            self.timer = None
            return
        ctx = self.ctx
        seed = ctx.profile.seed
        k = self.k
        self.k = k + 1
        n = k - self.anchor_k
        t = self.sim_anchor + n * self.tick_interval
        self.sensors.advance(k, t, t - self.last_t)
        self.last_t = t
        f = self.faults
        put = self.outbox.put
        sent = 0
        for si, (stream, every, topic, etype) in enumerate(self.streams):
            if k % every:
                continue
            data = self.sensors.read(stream)
            if data is None:
                continue
            seq = self.seqs[si] = self.seqs[si] + 1
            payload = self._encode(etype, data, seq)
            put(Entry(topic, payload, stream, seq))
            sent += 1
            if f.duplicate and uniform(seed, self.index, si, seq, _P_DUP) < f.duplicate:
                put(Entry(topic, payload, None, seq))  # the same message again
                self.counters["duplicates_sent"] += 1
                sent += 1
            if f.garbage and uniform(seed, self.index, si, seq, _P_GARBAGE) < f.garbage:
                put(Entry(topic, garbage_payload(payload, seed, self.index, si, seq), None, 0))
                self.counters["garbage_sent"] += 1
                sent += 1
        if sent:
            self.sensors.sent(sent)
            ctx.counters.generated += sent
            self.wake.set()
        # next tick: on the anchored grid (no drift), jittered by a seeded fraction
        ti = self.tick_interval
        jit = ctx.profile.jitter
        due = self.anchor + (n + 1) * ti
        if jit:
            due += (uniform(seed, self.index, k + 1, _P_JITTER) * 2 - 1) * jit * ti
        self.timer = asyncio.get_running_loop().call_at(due, self._tick)

    def _encode(self, etype: str, reading: dict[str, Any], seq: int) -> bytes:
        f = self.faults
        data: dict[str, Any] = {"seq": seq, "boot": self.boot, "fw": self.firmware}
        if f.newer is None:
            data.update(reading)
        else:
            rename = f.newer.rename
            for key, value in reading.items():
                data[rename.get(key, key)] = value
            data.update(f.newer.extra)
        # a copy of its own size: orjson's bytes keep their 4 KiB buffer, and a reading
        # lives in the outbox until its PUBACK (4 KiB per held reading, 0.37 with the copy)
        return memoryview(orjson.dumps(
            {
                "specversion": "1.0",
                "id": new_id(),
                "source": self.source,
                "type": etype,
                "time": self._time(),
                "subject": self.name,
                "datacontenttype": "application/json",
                "simrun": self.ctx.run_id,
                "data": data,
            }
        )).tobytes()

    def _time(self) -> str:
        t = time.time()
        f = self.faults
        if f.skew or f.drift_ppm:
            t += f.skew + f.drift_ppm * 1e-6 * (t - self.ctx.wall_start)
        return rfc3339_ms(int(t * 1000))

    def _event(self, topic: str, etype: str, data: dict[str, Any], correlationid: str) -> None:
        """Queue an event (reply, OTA progress) in the outbox: it survives a dropped link."""
        body = memoryview(orjson.dumps(
            {
                "specversion": "1.0",
                "id": new_id(),
                "source": self.source,
                "type": etype,
                "time": self._time(),
                "subject": self.name,
                "datacontenttype": "application/json",
                "correlationid": correlationid,
                "simrun": self.ctx.run_id,
                "data": data,
            }
        )).tobytes()  # its own size (see _encode)
        self.outbox.put(Entry(topic, body, None, 0))
        self.counters["events_sent"] += 1
        self.wake.set()

    # ------------------------------------------------------------------ faults

    def _fault(self, kind: str, arg: Any) -> None:
        self.timers = [h for h in self.timers if not h.cancelled() and h.when() > self._now()]
        self.ctx.count_fault(kind)
        if kind == "drop":
            self.drop_link(arg)
        elif kind == "die":
            self.power_off("power_loss", graceful=False)
            if arg is not None:
                self.timers.append(asyncio.get_running_loop().call_later(arg, self.power_on))
        elif kind == "storm":
            duration, rate = arg
            if self.alive:
                log.info("%s: message storm for %.1f s at %g ticks/s", self.name, duration, rate)
                self.storm_until = self._now() + duration
                self._rebase(1.0 / rate)
                self.timers.append(asyncio.get_running_loop().call_later(duration, self._storm_end))

    def _storm_end(self) -> None:
        self.storm_until = 0.0
        if self.alive:
            self._rebase(self.interval)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def drop_link(self, seconds: float) -> None:
        """The network goes away for ``seconds``: no DISCONNECT, the broker fires the will."""
        self.net_down_until = max(self.net_down_until, self._now() + seconds)
        if self.client is not None and self.client.connected:
            self._abort(self.client)
        self.wake.set()

    def power_off(self, reason: str, graceful: bool) -> None:
        """Power is gone: no more ticks; RAM (the outbox) is lost and counted under
        ``reason``. Not ``graceful``: the connection is aborted (the broker fires the
        will); ``graceful``: the caller already sent ``offline`` and DISCONNECT."""
        if not self.alive:
            return
        self.alive = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        c = self.client
        if c is not None and c.connected and not graceful:
            self._abort(c)
        self.outbox.clear(reason)
        self.ctx.emptied(self.name)
        self.wake.set()

    def power_on(self) -> None:
        """Boot again: a new boot count; ticks resume; the link reconnects."""
        if self.alive or self.ctx.stopping:
            return
        self.alive = True
        self.measuring = True
        self.boot += 1
        self.desired_version = 0
        self.ctx.counters.boots += 1
        self.anchor = self._now()
        self.anchor_k = self.k
        self.sim_anchor = self.last_t
        self.tick_interval = self.interval
        self.timer = asyncio.get_running_loop().call_at(self.anchor, self._tick)
        self.wake.set()

    # ------------------------------------------------------------------ link

    @property
    def online(self) -> bool:
        """Connected and announced: false the moment the connection is aborted, not only
        once the link task next runs (a poll on the same tick must not see a dead link)."""
        c = self.client
        return self._announced and c is not None and c.connected

    def _abort(self, client: MQTTClient) -> None:
        """End an accepted connection without DISCONNECT: the broker fires the will."""
        self.counters["abnormal_disconnects"] += 1
        client.abort()

    async def run(self, connect_at: float) -> None:
        """The device's link task: connect, send, reconnect, until the fleet stops."""
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        p = ctx.profile
        ramp = ctx.ramp
        backoff = Backoff(p.reconnect.initial, max(p.reconnect.initial, p.reconnect.cap), ctx.rng)
        delay = connect_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        while not ctx.stopping or (self.alive and len(self.outbox) and not ctx.drain_over):
            if not self.alive:
                await self._sleep(None)
                continue
            if loop.time() < self.net_down_until:
                # the radio is down: attempts fail, and back off as they would
                self._switch_on()
                self.counters["connect_failures"] += 1
                await self._sleep(min(backoff.next(), self.net_down_until - loop.time() + 0.05))
                continue
            client = MQTTClient(
                ctx.url,
                f"{ctx.client_prefix}{self.name}",
                clean_session=p.clean_session,
                keepalive=p.keepalive,
                will=Will(self.state_topic, _OFFLINE, 1, True),
                on_message=self._on_message,
                max_inflight=p.window,
                connect_timeout=10.0,
            )
            # one slot of the ramp from the socket's opening to the birth's PUBACK
            await ramp.acquire()
            held = True
            try:
                self._switch_on()
                t = loop.time()
                try:
                    await client.connect()
                except (ConnectError, OSError) as e:
                    ramp.failed()
                    ramp.release()
                    held = False
                    self.counters["connect_failures"] += 1
                    log.debug("%s: connect failed: %s", self.name, e)
                    await self._sleep(backoff.next())
                    continue
                ramp.connack(loop.time() - t)
                # the broker accepted it: a connection from here on, whose abort fires the will
                self.counters["connects"] += 1
                if not self.alive or ctx.drain_over:
                    await client.close()
                    continue
                if loop.time() < self.net_down_until:
                    # the radio went down while the handshake was in flight
                    self._abort(client)
                    continue
                self.client = client
                client.closed.add_done_callback(lambda _f: self.wake.set())
                try:
                    await client.subscribe(
                        [(f"cmd/{self.name}/+", 1), (f"shadow/{self.name}/desired", 1)]
                    )
                    await client.publish(self.state_topic, self._birth(), 1, retain=True)
                    ramp.release()
                    held = False
                    backoff.connected()  # starts over only if this connection stays up (edge/backoff.py)
                    self._announced = True
                    ctx.counters.connected += 1
                    ctx.connection_changed.set()
                    try:
                        await self._pump(client)
                    finally:
                        self._announced = False
                        ctx.counters.connected -= 1
                        ctx.connection_changed.set()
                except ConnectionLost:
                    pass
                finally:
                    self.client = None
                    if client.connected and (ctx.stopping or not self.alive):
                        pass  # the fleet (or a reboot) closes it
                    elif client.connected:
                        client.abort()
                    self.outbox.requeue_all()
            finally:
                if held:
                    ramp.release()
            if self.alive and loop.time() >= self.net_down_until and not ctx.drain_over:
                # the broker or the path to it went away: back off before trying again
                self.counters["link_lost"] += 1
                await self._sleep(backoff.next())

    async def _sleep(self, seconds: float | None) -> None:
        """Sleep, but wake early on a state change (power on, fleet stop)."""
        self.wake.clear()
        if seconds is not None and self.ctx.stopping:
            seconds = min(seconds, 0.25)  # draining at the end: do not wait out a long backoff
        if seconds is None:
            await self.wake.wait()
            return
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await self.wake.wait()
        except TimeoutError:
            pass

    async def _pump(self, client: MQTTClient) -> None:
        outbox = self.outbox
        wake = self.wake
        acked = self._acked
        while client.connected and self.alive:
            item = outbox.next_unsent()
            if item is None:
                wake.clear()
                if self.ctx.stopping and not len(outbox):
                    self.ctx.emptied(self.name)
                await wake.wait()
                continue
            key, entry = item
            fut = await client.publish_nowait(entry.topic, entry.payload, 1)
            assert fut is not None
            fut.add_done_callback(partial(acked, key))

    def _acked(self, key: int, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        entry = self.outbox.ack(key)
        if entry is None:
            return
        self.counters["acked"] += 1
        self.ctx.counters.acked += 1
        if entry.stream is not None:
            for si, s in enumerate(self.streams):
                if s[0] == entry.stream:
                    self.acked_by_stream[si] += 1
                    break
        if self.ctx.stopping and not len(self.outbox):
            self.ctx.emptied(self.name)

    def _birth(self) -> bytes:
        return orjson.dumps(
            {
                "state": "online",
                "device": self.name,
                "firmware": self.firmware,
                "boot": self.boot,
                "sensors": [s[0] for s in self.streams],
                "interval": self.interval,
                "time": self._time(),
                "simrun": self.ctx.run_id,
            }
        )

    async def shutdown(self) -> None:
        """Clean stop at the end of a run: ``offline`` (retained), then DISCONNECT."""
        self.stop_ticks()
        await self._say_offline(5)

    async def _say_offline(self, wait: float) -> None:
        """Publish the retained ``offline`` (waiting up to ``wait`` s), then DISCONNECT."""
        c = self.client
        if c is not None and c.connected:
            try:
                async with asyncio.timeout(wait):
                    await c.publish(self.state_topic, _OFFLINE, 1, retain=True)
            except (ConnectionLost, TimeoutError):
                pass
            await c.close()

    # ------------------------------------------------------------------ commands

    def _on_message(self, msg: Message) -> None:
        """Commands and desired state (firmware_sim/commands.py), then the PUBACK."""
        c = self.client
        try:
            commands.on_message(self, msg)
        finally:
            if msg.qos and c is not None:
                c.ack(msg.pid)

    async def _reboot(self, firmware: str | None, cid: str) -> None:
        try:
            await self._flush(2.0)  # firmware sends what it holds before restarting
            if not self.alive:
                return  # lost power meanwhile: it boots (or not) on its own schedule
            await self._say_offline(2)
            self.power_off("reboot", graceful=True)
            await asyncio.sleep(self.ctx.profile.reboot_time)
            if firmware is not None:
                self.firmware = firmware
            self.power_on()
        finally:
            self._busy = False

    async def _ota(self, version: str, duration: float, cid: str) -> None:
        steps = (0, 25, 50, 75, 100)
        try:
            for i, pct in enumerate(steps):
                if i:
                    await asyncio.sleep(duration / (len(steps) - 1))
                if not self.alive:
                    return  # power lost during the update: the old firmware boots again
                self._event(
                    f"evt/ota/{self.name}",
                    "io.edgeferry.ota.progress",
                    {"command_id": cid, "version": version, "from": self.firmware, "progress": pct},
                    cid,
                )
            commands.ota_done(self, cid, version)
            await self._reboot(version, cid)
        finally:
            self._busy = False

    async def _flush(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a cancel
        """Wait (bounded) until the outbox is empty."""
        deadline = self._now() + timeout
        while len(self.outbox) and self._now() < deadline and self.client is not None:
            c = self.client
            if c.connected:
                try:
                    async with asyncio.timeout(max(0.0, deadline - self._now())):
                        await c.drain()
                except (ConnectionLost, TimeoutError):
                    return
                # the pump may still hold unsent entries: give it a moment to send them
                await asyncio.sleep(0.01)
            else:
                return

    # ------------------------------------------------------------------ manifest

    def record(self) -> dict[str, Any]:
        streams = {}
        for si, (stream, _every, _topic, _type) in enumerate(self.streams):
            last = self.seqs[si]
            dropped = self.outbox.dropped_seqs.get(stream)
            streams[stream] = {
                "first": 1 if last else 0,
                "last": last,
                "sent": last,
                "acked": self.acked_by_stream[si],
                "dropped": dropped.to_json() if dropped is not None else [],
            }
        out: dict[str, Any] = {
            "client_id": f"{self.ctx.client_prefix}{self.name}",
            "firmware": self.firmware,
            "boots": self.boot,
            "interval": self.interval,
            "streams": streams,
            "dropped": dict(self.outbox.drop_reasons),
        }
        out.update(self.counters)
        plan = self.faults.to_json()
        if plan:
            out["faults"] = plan
        return out
