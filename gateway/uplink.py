"""The store-and-forward uplink: local broker -> SQLite store -> batch frames -> cloud.

Three loops share one event loop (plus a writer and a reader thread for SQLite):

* **intake** holds a persistent QoS 1 session on the local broker. Each message is
  routed to a lane and queued for the next group commit; it is acknowledged (PUBACK)
  only after that commit. A message the broker redelivers after a crash or a dropped
  connection (committed here, acknowledgement lost) is recognised by packet id and
  content during the redelivery phase of a resumed session and not stored twice.
* **committer** writes at most one transaction per ``commit_interval``: new records,
  removal of records the cloud acknowledged, evictions and TTL expiry.
* **uplink** keeps a session on the cloud broker. Once connected it drains at once,
  lane by lane in priority order, in sequence order, ``window`` frames in flight; a
  record leaves the store only after the cloud broker acknowledged its frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from edge._tls import explain
from edge.backoff import Backoff, connect_retrying, sleep_unless
from edge.errors import ConnectError, ConnectionLost
from edge.mqtt import Message, MQTTClient
from gateway import frames
from gateway.downlink import Downlink
from gateway.profiles import CloudLimits
from gateway.settings import GatewaySettings
from gateway.store import RECORD_OVERHEAD, Store
from gateway.topics import INGEST_HELLO, LaneRouter, ack_topic, nack_topic, uplink_topic

__all__ = ["Gateway"]

log = logging.getLogger("edgeferry.gateway")

COMMIT_RECORDS = 2000
COMMIT_BYTES = 512 * 1024
"""A batch this large is committed at once, without waiting for commit_interval."""

MAX_PENDING = 5000
MAX_PENDING_BYTES = 8 * 1024 * 1024
"""Messages (bytes) in hand before the next commit; beyond, the gateway stops reading."""

REDELIVERY_WINDOW = 20000
"""Newest stored records checked against redeliveries after a restart (more than
Mosquitto's in-flight window; packet ids repeat only every 65535 messages)."""


class Gateway:
    """The gateway: ``async with Gateway(settings) as gw: await gw.wait()``."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.s = settings
        self.store = Store(settings.store, settings.lanes, max_bytes=settings.max_store_bytes,
                           sync=settings.sync, node_id=settings.node_id)
        self._router = LaneRouter([(ln.name, ln.filters) for ln in settings.lanes], settings.default_lane)
        self._lane_order = [ln.name for ln in settings.lanes]
        self._policy = {ln.name: ln.when_full for ln in settings.lanes}
        self._wx = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._rx = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._stop = asyncio.Event()
        self._entered = False
        # intake
        self._local: MQTTClient | None = None
        self._cloud: MQTTClient | None = None
        self._pending: list[tuple[str, str, bytes, int, int]] = []
        self._pending_bytes: dict[str, int] = {}
        self._pending_size = 0
        self._pending_since = 0.0
        self._full = asyncio.Event()
        self._paused = False
        self._held: dict[str, deque[Message]] = {}
        self._used = 0
        # packet id -> hash of (topic, payload) of the newest stored records: what the
        # broker may redeliver when a session resumes (hashes, not payloads)
        self._candidates: dict[int, int] = {}
        self._redelivery = False
        self._confirmed_seq = 0
        # committer
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._new_drops: dict[str, int] = {}
        self._drops_committing: dict[str, int] = {}
        self._last_delete = 0.0
        # uplink
        self._uplink_wake = asyncio.Event()
        self._acked: dict[str, int] = {}  # per lane: highest seq the cloud broker acknowledged
        self._ingested: dict[str, int] = {}  # per lane: highest seq ingest reported written
        self._resend = False
        self._rewind: dict[str, int] = {}
        self._deleted: dict[str, int] = {}
        self._cloud_up = False
        self.limits = CloudLimits(settings.profile, settings.frame_max_bytes,
                                  partial(uplink_topic, settings.node_id), settings.node_id)
        self._cloud_error: tuple[str, str] | None = None  # (kind, line) of the last failure
        self._local_up = False
        self.ready = asyncio.Event()  # store open and the local broker connected (systemd READY=1)
        self._offline_since: float | None = time.time()  # wall clock, for display
        self._offline_mono: float | None = time.monotonic()  # durations
        # counters (also persisted drops live in store.drops)
        self.counters: dict[str, int] = {
            "received": 0, "stored": 0, "acked_local": 0, "uplinked_records": 0, "frames": 0,
            "redelivered_duplicates": 0, "retained_skipped": 0, "held": 0, "commits": 0,
            "cloud_connects": 0, "local_connects": 0,
        }
        self.rejected: dict[str, int] = {}
        self.downlink = Downlink(settings) if settings.downlink else None
        # failpoint for tests: EDGEFERRY_FAILPOINT=crash_after_commit:N kills the process
        # (SIGKILL) right after the Nth commit, before the local acknowledgement
        fp = os.environ.get("EDGEFERRY_FAILPOINT", "")
        self._crash_after = int(fp.split(":")[1]) if fp.startswith("crash_after_commit:") else None

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Gateway:
        if self._entered:
            raise RuntimeError("a Gateway can be entered only once")
        self._entered = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._wx, self.store.open)
        self._used = self.store.total_bytes
        for lane in self._lane_order:
            self._acked[lane] = self._deleted[lane] = self._ingested[lane] = 0
        self._startup_high = self.store.next_seq - 1
        log.info("gateway %s: store %s epoch %d, backlog %d records (%d bytes), next seq %d",
                 self.s.node_id, self.store.path, self.store.epoch,
                 sum(ln.count for ln in self.store.lanes.values()), self.store.total_bytes,
                 self.store.next_seq)
        for note in self.s.notes:
            log.warning("cloud profile: %s", note)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._tasks = [
            self._tg.create_task(self._intake_loop(), name="intake"),
            self._tg.create_task(self._committer(), name="committer"),
            self._tg.create_task(self._cloud_loop(), name="uplink"),
            self._tg.create_task(self._housekeeping(), name="housekeeping"),
        ]
        if self.downlink is not None:
            self._tasks.append(self._tg.create_task(self.downlink.run(self._stop), name="downlink"))
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._stop.set()
        try:
            await self._shutdown()
        finally:
            assert self._tg is not None
            for task in self._tasks:
                task.cancel()
            try:
                await self._tg.__aexit__(None, None, None)
            except BaseExceptionGroup as eg:  # noqa: F821 - builtin in 3.11
                log.error("gateway task failed at shutdown: %r", eg.exceptions)
            await asyncio.get_running_loop().run_in_executor(self._wx, self.store.close)
            self._wx.shutdown(wait=True)
            self._rx.shutdown(wait=True)

    async def wait(self) -> None:
        """Run until :meth:`stop` is called (or a task fails)."""
        await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._uplink_wake.set()

    async def _shutdown(self) -> None:
        # take no new messages, finish the commit in flight and acknowledge it, then
        # leave the local broker: what was not committed stays with the broker
        self._closing = True
        self._discard_pending()
        await self._idle.wait()
        if self._local is not None and self._local.connected:
            await self._local.close()
        # remove what the cloud acknowledged, so a restart does not resend it
        deletes = self._due_deletes(force=True)
        if deletes:
            await asyncio.get_running_loop().run_in_executor(self._wx, self.store.commit, [], deletes, {})

    # ------------------------------------------------------------ intake

    async def _intake_loop(self) -> None:
        backoff = Backoff(0.2, self.s.backoff_max)

        def make() -> MQTTClient:
            # set before connecting: redeliveries can arrive with the CONNACK
            self._local = MQTTClient(self.s.local, self.s.gateway_client_id, clean_session=False,
                                     keepalive=self.s.local_keepalive, on_message=self._on_local)
            return self._local

        while not self._stop.is_set():
            self._discard_pending()
            self._paused = False
            self._held.clear()
            # every commit of the previous connection is done (see below): the newest
            # stored records include whatever the broker may redeliver
            self._candidates = await asyncio.get_running_loop().run_in_executor(
                self._wx, self.store.recent_hashes, REDELIVERY_WINDOW)
            self._redelivery = True
            before = self.store.next_seq - 1
            dups_before = self.counters["redelivered_duplicates"]
            client = await connect_retrying(make, backoff, self._stop, "local broker", log)
            if client is None:
                break
            present = client.session_present
            self.counters["local_connects"] += 1
            if not present:
                # a new session has nothing to redeliver
                self._redelivery = False
                self._candidates.clear()
            try:
                granted = await client.subscribe([(f, 1) for f in self.s.uplink])
                for f, g in zip(self.s.uplink, granted, strict=False):
                    if g == 0x80:
                        log.error("local broker refused the subscription to %r", f)
                # every redelivery precedes the answer to this ping
                await client.ping()
                self._redelivery = False
                self._candidates.clear()
                dups = self.counters["redelivered_duplicates"] - dups_before
                if dups:
                    log.info("resumed session: %d redelivered messages were already stored "
                             "(acknowledged, not stored again)", dups)
                self._confirmed_seq = max(self._confirmed_seq, before)
                self._local_up = True
                self.ready.set()
                log.info("local broker %s connected (session %s)", client.url,
                         "resumed" if present else "new")
                await client.closed
            except ConnectionLost as e:
                if not self._stop.is_set():
                    log.warning("local broker: %s", e)
            finally:
                self._local_up = False
            # let the commit in flight finish; its messages become redelivery candidates
            await self._idle.wait()
            if not self._stop.is_set():
                await self._sleep(backoff.next())

    def _on_local(self, m: Message) -> None:
        counters = self.counters
        counters["received"] += 1
        client = self._local
        if client is None or self._closing:
            return
        if m.retain:
            # a retained message replayed by (re)subscribing is a snapshot, not a new event
            counters["retained_skipped"] += 1
            if m.qos:
                client.ack(m.pid)
            return
        if len(m.payload) > self.s.max_message_bytes:
            self._reject("oversize", m, client)
            return
        if not self.limits.record_fits(self._router(m.topic), m.topic, m.payload):
            self._reject("too_large_for_cloud", m, client)  # no frame the broker takes holds it
            return
        if self._redelivery and m.pid in self._candidates:
            if self._candidates[m.pid] == hash((m.topic, m.payload)):
                counters["redelivered_duplicates"] += 1
                client.ack(m.pid)
                return
        lane = self._router(m.topic)
        held = self._held.get(lane)
        if held:
            held.append(m)
            counters["held"] += 1
            return
        size = len(m.topic) + len(m.payload) + RECORD_OVERHEAD
        if self._used + size > self.s.max_store_bytes and not self._room_for(lane, size):
            if self._policy[lane] == "block":
                log.warning("lane %s is full: holding messages unacknowledged at the local broker", lane)
                self._held[lane] = deque([m])
                counters["held"] += 1
            else:
                self._drop(f"store_full:{lane}")
                if m.qos:
                    client.ack(m.pid)
            return
        self._used += size
        self._pending_bytes[lane] = self._pending_bytes.get(lane, 0) + size
        pending = self._pending
        if not pending:
            self._pending_since = time.monotonic()
        pending.append((lane, m.topic, m.payload, int(time.time() * 1000), m.pid))
        self._pending_size += size
        if len(pending) >= COMMIT_RECORDS or self._pending_size >= COMMIT_BYTES:
            self._full.set()
        if (len(pending) >= MAX_PENDING or self._pending_size >= MAX_PENDING_BYTES) and not self._paused:
            # Mosquitto 2.0.11 does not apply max_inflight_messages to a resumed session's
            # queue: stop reading until the committer took this batch (TCP holds the rest)
            self._paused = True
            client.pause_reading()
        if not self._wake.is_set():
            self._wake.set()

    def _room_for(self, lane: str, size: int) -> bool:
        """Can the next commit make room by evicting telemetry? A drop_oldest lane may only
        evict its own oldest records; a block lane may evict any drop_oldest lane."""
        over = self._used + size - self.s.max_store_bytes
        lanes = self.store.lanes
        pending = self._pending_bytes
        if self._policy[lane] == "drop_oldest":
            evictable = lanes[lane].bytes + pending.get(lane, 0)
        else:
            evictable = sum(st.bytes + pending.get(n, 0) for n, st in lanes.items()
                            if self._policy[n] == "drop_oldest")
        return evictable >= over

    def _discard_pending(self) -> None:
        """Forget messages not yet committed (their connection is gone: the broker
        redelivers them)."""
        for b in self._pending_bytes.values():
            self._used -= b
        self._pending = []
        self._pending_bytes = {}
        self._pending_size = 0

    def _reject(self, reason: str, m: Message, client: MQTTClient) -> None:
        n = self.rejected.get(reason, 0) + 1
        self.rejected[reason] = n
        self._drop(f"rejected:{reason}")
        if n <= 10 or n % 1000 == 0:
            log.warning("rejected message on %r (%d bytes): %s (%d so far)", m.topic, len(m.payload), reason, n)
        if m.qos:
            client.ack(m.pid)

    def _drop(self, reason: str) -> None:
        self._new_drops[reason] = self._new_drops.get(reason, 0) + 1
        self._wake.set()

    def _release_held(self) -> None:
        if not self._held or self._local is None:
            return
        for lane, held in list(self._held.items()):
            while held:
                m = held[0]
                size = len(m.topic) + len(m.payload) + RECORD_OVERHEAD
                if self._used + size > self.s.max_store_bytes and not self._room_for(lane, size):
                    break
                held.popleft()
                self._used += size
                self._pending_bytes[lane] = self._pending_bytes.get(lane, 0) + size
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending_size += size
                self._pending.append((lane, m.topic, m.payload, int(time.time() * 1000), m.pid))
            if not held:
                del self._held[lane]
                log.info("lane %s has room again: accepting messages", lane)
        if self._pending:
            self._wake.set()

    # ------------------------------------------------------------ committer

    async def _committer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            # group commit: wait until the batch is big enough or its oldest message has
            # waited commit_interval (fewer, larger commits write less to flash)
            while self._pending and not self._full.is_set() and not self._closing:
                wait = self._pending_since + self.s.commit_interval - time.monotonic()
                if wait <= 0:
                    break
                try:
                    async with asyncio.timeout(wait):
                        await self._full.wait()
                except TimeoutError:
                    break
            self._full.clear()
            if self._closing:
                continue
            deletes = self._due_deletes()
            if not self._pending and not deletes and not self._new_drops:
                continue
            client = self._local
            batch, self._pending = self._pending, []
            batch_bytes, self._pending_bytes = self._pending_bytes, {}
            self._pending_size = 0
            if self._paused:
                self._paused = False
                if client is not None:
                    client.resume_reading()
            drops, self._new_drops = self._new_drops, {}
            self._drops_committing = drops  # still shown by status() until committed
            self._idle.clear()
            try:
                res = await loop.run_in_executor(self._wx, self.store.commit, batch, deletes, drops)
            except Exception as e:  # disk full, I/O error: keep the batch, try again
                self._drops_committing = {}
                log.error("store commit failed (%s); retrying", e)
                self._pending[:0] = batch
                for k, v in batch_bytes.items():
                    self._pending_bytes[k] = self._pending_bytes.get(k, 0) + v
                    self._pending_size += v
                for k, v in drops.items():
                    self._new_drops[k] = self._new_drops.get(k, 0) + v
                self._idle.set()
                await asyncio.sleep(1.0)
                self._wake.set()
                continue
            self._drops_committing = {}
            self.counters["commits"] += 1
            for lane, upto in deletes.items():
                self._deleted[lane] = upto
            for part in (res.deleted, res.evicted, res.expired):
                for _, (_, b) in part.items():
                    self._used -= b
            if res.evicted:
                log.warning("store full: evicted %s", {k: v[0] for k, v in res.evicted.items()})
            if batch:
                self.counters["stored"] += len(batch)
                if self._crash_after is not None:
                    self._crash_after -= 1
                    if self._crash_after <= 0:
                        log.warning("failpoint crash_after_commit: killing myself before acknowledging")
                        os.kill(os.getpid(), signal.SIGKILL)
                self._ack(client, batch, res.last_seq)
                self._uplink_wake.set()
            self._idle.set()
            self._release_held()

    def _ack(self, client: MQTTClient | None, batch: list[tuple[str, str, bytes, int, int]], last_seq: int) -> None:
        if client is not None and client is self._local and client.connected:
            pids = [r[4] for r in batch if r[4]]
            client.ack_many(pids)
            self.counters["acked_local"] += len(pids)
            try:
                ping = client.ping()
            except ConnectionLost:
                return
            ping.add_done_callback(partial(self._confirmed, last_seq))
        # else: the connection that delivered these is gone: the broker redelivers them,
        # and the next connection recognises them among the newest stored records

    def _confirmed(self, last_seq: int, fut: asyncio.Future[None]) -> None:
        """The broker answered a ping sent after our PUBACKs: it has them (it handles a
        connection's packets in order), so records up to last_seq may leave the store."""
        if fut.cancelled() or fut.exception() is not None:
            return
        self._confirmed_seq = max(self._confirmed_seq, last_seq)

    def _due_deletes(self, force: bool = False) -> dict[str, int]:
        now = time.monotonic()
        if not force and now - self._last_delete < 1.0:
            return {}
        out = {}
        for lane in self._acked:
            upto = min(self._delivered(lane), self._confirmed_seq)
            if upto > self._deleted[lane]:
                out[lane] = upto
        if out:
            self._last_delete = now
        return out

    async def _housekeeping(self) -> None:
        while not self._stop.is_set():
            await self._sleep(1.0)
            if any(self._delivered(n) > self._deleted[n] for n in self._acked) or any(
                ln.spec.ttl for ln in self.store.lanes.values()
            ):
                self._wake.set()
            if self.s.confirm == "ingest":
                self.limits.watch_confirmations(self._acked, self._ingested)

    # ------------------------------------------------------------ uplink

    async def _cloud_loop(self) -> None:
        backoff = Backoff(0.2, self.s.backoff_max)

        def make() -> MQTTClient:
            self._cloud = MQTTClient(self.s.cloud, self.s.gateway_client_id, clean_session=False,
                                     keepalive=self.s.keepalive, max_inflight=self.s.window,
                                     on_message=self._on_cloud, tls=tls,
                                     password_file=self.s.password_file)
            return self._cloud

        tls = self.s.tls
        while not self._stop.is_set():
            client = await connect_retrying(make, backoff, self._stop, "cloud broker", log,
                                            on_error=self._cloud_failed)
            if client is None:
                break
            self.counters["cloud_connects"] += 1
            self._cloud_up = True
            self._cloud_error = None
            down_for = time.monotonic() - self._offline_mono if self._offline_mono else 0.0
            self._offline_since = self._offline_mono = None
            log.info("cloud broker %s connected after %.1f s offline; draining %d records",
                     client.url, down_for, sum(ln.count for ln in self.store.lanes.values()))
            client.closed.add_done_callback(lambda _: self._uplink_wake.set())
            self.limits.connected()
            try:
                if self.s.confirm == "ingest":
                    await client.subscribe([(ack_topic(self.s.node_id), 1), (nack_topic(self.s.node_id), 1),
                                            (INGEST_HELLO, 1)])
                await self._uplink(client)
            except ConnectionLost as e:
                why = client.closed.exception() if client.closed.done() else None
                log.warning("cloud link lost: %s", why or e)
                self._cloud_error = ("lost", str(why or e))
            finally:
                self._cloud_up = False
                self._offline_since, self._offline_mono = time.time(), time.monotonic()
                self.limits.lost()
                if self._stop.is_set():
                    await client.close()
                else:
                    client.abort()
            if not self._stop.is_set():
                await self._sleep(backoff.next())

    async def _uplink(self, client: MQTTClient) -> None:
        loop = asyncio.get_running_loop()
        s = self.s
        sent = {lane: self._delivered(lane) for lane in self._lane_order}
        self._resend = False
        inflight: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {n: deque() for n in self._lane_order}
        linger_ms = int(s.frame_linger * 1000)
        compress = s.compress == "zstd"
        lanes = self.store.lanes
        while not self._stop.is_set():
            if client.closed.done():
                client.closed.result()
            self._uplink_wake.clear()
            if self._resend:
                # ingest lost its queue (new session): send again what it has not confirmed
                self._resend = False
                sent = {lane: self._delivered(lane) for lane in self._lane_order}
                self._rewind.clear()
                log.info("ingest started a new session: resending unconfirmed records")
            if self._rewind:
                # ingest saw a frame that did not follow what it holds: resend that lane
                for lane, after in self._rewind.items():
                    if sent[lane] > after:
                        log.info("ingest asked to resend lane %s after seq %d", lane, after)
                        sent[lane] = after
                self._rewind.clear()
            progress = False
            deadline: float | None = None
            for name in self._lane_order:
                if lanes[name].newest_seq <= sent[name]:
                    continue
                rows = await loop.run_in_executor(
                    self._rx, self.store.read, name, sent[name], s.frame_max_records, self.limits.cap(name))
                if not rows:  # evicted or expired meanwhile
                    sent[name] = max(sent[name], lanes[name].newest_seq)
                    continue
                if len(rows) < s.frame_max_records and any(inflight.values()):
                    age = int(time.time() * 1000) - rows[0][1]
                    if 0 <= age < linger_ms:  # (a wall-clock jump back: send, not wait)
                        wait = (linger_ms - age) / 1000
                        deadline = wait if deadline is None else min(deadline, wait)
                        continue
                frame, rows = self.limits.fit(name, rows, partial(
                    frames.encode, s.node_id, self.store.epoch, name, compress=compress, prev_seq=sent[name]))
                await self.limits.take()
                fut = await client.publish_nowait(uplink_topic(s.node_id, name), frame, 1)
                self.limits.frame_sent(len(frame))
                assert fut is not None
                hi = rows[-1][0]
                sent[name] = hi
                inflight[name].append((hi, fut))
                fut.add_done_callback(partial(self._frame_acked, name, inflight[name], len(rows)))
                self.counters["frames"] += 1
                progress = True
            if progress:
                continue
            try:
                async with asyncio.timeout(deadline):
                    await self._uplink_wake.wait()
            except TimeoutError:
                pass

    def _cloud_failed(self, e: ConnectError) -> None:
        self._cloud_error = (explain(e)[0], str(e))  # the client's line names the kind already

    def _delivered(self, lane: str) -> int:
        """Highest seq of a lane that may leave the store."""
        if self.s.confirm == "ingest":
            return self._ingested[lane]
        return self._acked[lane]

    def _on_cloud(self, m: Message) -> None:
        client = self._cloud
        if m.qos and client is not None:
            client.ack(m.pid)
        if m.topic == INGEST_HELLO:
            try:
                hello = json.loads(m.payload)
            except ValueError:
                return
            if isinstance(hello, dict) and not hello.get("session_present", True):
                self._resend = True
                self._uplink_wake.set()
            return
        try:
            ack = json.loads(m.payload)
            if int(ack["epoch"]) != self.store.epoch:
                return  # about a previous store of this node
            if m.topic.endswith("/nack"):
                lane, after = str(ack["lane"]), int(ack["after"])
                if lane in self._ingested:
                    self._rewind[lane] = min(after, self._rewind.get(lane, after))
                    self._uplink_wake.set()
                return
            for lane, seq in ack["lanes"].items():
                if lane in self._ingested and int(seq) > self._ingested[lane]:
                    self._ingested[lane] = int(seq)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignored a malformed ingest ack on %r", m.topic)

    def _frame_acked(self, lane: str, q: deque[tuple[int, asyncio.Future[None]]], n: int,
                     fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        self.limits.frame_acked()
        self.counters["uplinked_records"] += n
        while q and q[0][1].done() and not q[0][1].cancelled() and q[0][1].exception() is None:
            hi, _ = q.popleft()
            if hi > self._acked[lane]:
                self._acked[lane] = hi
        self._uplink_wake.set()

    # ------------------------------------------------------------ health

    def status(self) -> dict[str, Any]:
        lanes = {}
        for name, st in self.store.lanes.items():
            lanes[name] = {
                "records": st.count,
                "bytes": st.bytes,
                "oldest_age_s": None if (age := self.store.age_s(name)) is None else round(age, 3),
                "policy": st.spec.when_full,
                "held_at_broker": len(self._held.get(name, ())),
            }
        drops = dict(self.store.drops)
        for pending in (self._drops_committing, self._new_drops):
            for k, v in pending.items():
                drops[k] = drops.get(k, 0) + v
        return {
            "node_id": self.s.node_id,
            "epoch": self.store.epoch,
            "store": str(self.store.path),
            "running": True,
            "link": {"cloud": "up" if self._cloud_up else "down", "local": "up" if self._local_up else "down"},
            # why the cloud link is down: kind (tls_unknown_ca, tls_expired, tls_hostname,
            # tls_cert_refused, refused, unreachable, lost, ...) and the logged line
            "cloud_state": "up" if self._cloud_up else (self._cloud_error or ("down", ""))[0],
            "cloud_error": None if self._cloud_up or not self._cloud_error else self._cloud_error[1],
            "cloud_limits": self.limits.status(),
            "offline_since": self._offline_since,
            "offline_for_s": round(time.monotonic() - self._offline_mono, 3) if self._offline_mono else 0.0,
            "lanes": lanes,
            "store_bytes": self._used,
            "pending_commit": len(self._pending),
            "max_store_bytes": self.s.max_store_bytes,
            "drops": drops,
            "rejected": dict(self.rejected),
            "counters": dict(self.counters),
            "next_seq": self.store.next_seq,
            "downlink": self.downlink.status() if self.downlink is not None else None,
        }

    async def _sleep(self, seconds: float) -> None:
        await sleep_unless(self._stop, seconds)
