"""Intake: the local broker's messages -> lanes -> the batch for the next group commit.

The intake holds a persistent QoS 1 session on the local broker. Each message is
routed to a lane (gateway/topics.py) and added to the pending batch in the shared
state (gateway/state.py); the committer (gateway/committer.py) stores the batch and
hands it back through :meth:`Intake.committed`, which only then acknowledges the
messages (PUBACK). So a kill -9 between the two leaves a message with the broker.

A message the broker redelivers after a crash or a dropped connection (committed here,
acknowledgement lost) is recognised by packet id and content during the redelivery
phase of a resumed session (until the first ping answers) and not stored twice.

When a ``block`` lane is full its messages are held unacknowledged (the broker keeps
them); with too much in hand before the next commit, the intake stops reading and TCP
holds the rest at the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial

from edge._codec import RawPublish, raw_message
from edge.backoff import Backoff, connect_retrying, sleep_unless
from edge.errors import ConnectionLost
from edge.mqtt import Message, MQTTClient
from gateway.state import Record, State
from gateway.store import RECORD_OVERHEAD
from gateway.topics import LaneRouter

__all__ = ["Intake", "COMMIT_RECORDS", "COMMIT_BYTES", "MAX_PENDING", "MAX_PENDING_BYTES"]

log = logging.getLogger("edgeferry.gateway")

COMMIT_RECORDS = 2000
COMMIT_BYTES = 512 * 1024
"""A batch this large is committed at once, without waiting for commit_interval."""

MAX_PENDING = 6000
MAX_PENDING_BYTES = 8 * 1024 * 1024
"""Messages (bytes) in hand, pending and being committed; beyond, the gateway stops reading
until a commit ends. One socket read (uvloop's 256 KiB, about 2,000 small messages) may
go past it. This, not the backlog, sets the gateway's peak memory while a backlog is
built at full speed (docs/benchmarks.md, issue 15)."""

REDELIVERY_WINDOW = 20000
"""Newest stored records checked against redeliveries after a restart (more than
Mosquitto's in-flight window; packet ids repeat only every 65535 messages)."""

READ_HOLD = 0.05
"""While messages stream in, the local socket rests this long after each read (at most a
quarter of commit_interval): a message waits for its group commit anyway, and the next
read takes what gathered meanwhile in one go (edge.mqtt.MQTTClient's ``read_hold``). A
streaming message may so reach its commit up to this much later; a message after a quiet
spell is read at once."""

ROUTE_CACHE = 4096
"""Topics whose lane and size limit the intake keeps (the cache is dropped when full)."""


class Intake:
    """The local broker session; :meth:`run` until the state's ``stop`` is set."""

    def __init__(self, state: State) -> None:
        self.st = state
        s = state.s
        self._router = LaneRouter([(ln.name, ln.filters) for ln in s.lanes], s.default_lane)
        self.client: MQTTClient | None = None
        self._paused = False
        # packet id -> hash of (topic, payload) of the newest stored records: what the
        # broker may redeliver when a session resumes (hashes, not payloads)
        self._candidates: dict[int, int] = {}
        self._redelivery = False
        self._routes: dict[str, tuple[str, int, int]] = {}  # topic -> see _route

    async def run(self) -> None:
        st, s = self.st, self.st.s
        backoff = Backoff(0.2, s.backoff_max)
        loop = asyncio.get_running_loop()
        try:
            while not st.stop.is_set():
                st.discard_pending()
                self._paused = False
                st.held.clear()
                # every commit of the previous connection is done (see below): the newest
                # stored records include whatever the broker may redeliver
                self._candidates = await loop.run_in_executor(
                    st.writer, st.store.recent_hashes, REDELIVERY_WINDOW)
                self._redelivery = True
                before = st.store.next_seq - 1
                dups_before = st.counters["redelivered_duplicates"]
                client = await connect_retrying(self._new_client, backoff, st.stop, "local broker", log)
                if client is None:
                    break
                await self._session(client, before, dups_before)
                # let the commit in flight finish; its messages become redelivery candidates
                await st.idle.wait()
                if not st.stop.is_set():
                    await sleep_unless(st.stop, backoff.next())
        finally:
            if self.client is not None:
                self.client.abort()  # when cancelled (another task failed): no socket left open

    def _new_client(self) -> MQTTClient:
        s = self.st.s
        # set before connecting: redeliveries can arrive with the CONNACK
        self.client = MQTTClient(s.local, s.gateway_client_id, clean_session=False,
                                 keepalive=s.local_keepalive, on_batch=self._on_batch,
                                 read_hold=min(READ_HOLD, s.commit_interval / 4),
                                 password_file=s.local_password_file)
        return self.client

    async def _session(self, client: MQTTClient, before: int, dups_before: int) -> None:
        """One connection: subscribe, end the redelivery phase, wait until it closes."""
        st, s = self.st, self.st.s
        present = client.session_present
        st.counters["local_connects"] += 1
        if not present:
            # a new session has nothing to redeliver
            self._redelivery = False
            self._candidates.clear()
        try:
            granted = await client.subscribe([(f, 1) for f in s.uplink])
            for f, g in zip(s.uplink, granted, strict=False):
                if g == 0x80:
                    log.error("local broker refused the subscription to %r", f)
            # every redelivery precedes the answer to this ping
            await client.ping()
            self._redelivery = False
            self._candidates.clear()
            dups = st.counters["redelivered_duplicates"] - dups_before
            if dups:
                log.info("resumed session: %d redelivered messages were already stored "
                         "(acknowledged, not stored again)", dups)
            st.confirmed_seq = max(st.confirmed_seq, before)
            st.local_up = True
            st.ready.set()
            log.info("local broker %s connected (session %s)", client.url,
                     "resumed" if present else "new")
            await client.closed
        except ConnectionLost as e:
            if not st.stop.is_set():
                log.warning("local broker: %s", e)
        finally:
            st.local_up = False

    async def close(self) -> None:
        """Leave the local broker (DISCONNECT): what was not acknowledged stays there."""
        if self.client is not None and self.client.connected:
            await self.client.close()

    # ------------------------------------------------------------ messages in

    def _route(self, topic: str) -> tuple[str, int, int]:
        """(lane, largest payload accepted, store bytes of the record but its payload) of a
        topic: the same for every message on it, so computed once per topic."""
        st = self.st
        lane = self._router(topic)
        most = st.s.max_message_bytes
        cloud = st.limits.max_payload(lane, topic)
        if cloud is not None:
            most = min(most, cloud)
        route = (lane, most, len(topic) + RECORD_OVERHEAD)
        if len(self._routes) >= ROUTE_CACHE:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _on_batch(self, batch: list[RawPublish]) -> None:
        """The PUBLISHes of one socket read, in order. The common case (new messages, not
        retained, that fit) in one loop with the batch's state in locals and one
        wall-clock read; at the first message that is not, the state is written back and
        the rest of the batch goes message by message through :meth:`_on_message`."""
        st = self.st
        st.counters["received"] += len(batch)
        client = self.client
        if client is None or st.closing:
            return
        if self._redelivery or st.held:
            self._each(batch, 0)
            return
        routes = self._routes
        pending = st.pending
        if not pending:
            # the first of a batch wakes the committer (later ones find it awake)
            st.pending_since = time.monotonic()
            st.wake.set()
        append = pending.append
        pending_bytes = st.pending_bytes
        used = st.used
        room = st.s.max_store_bytes - used
        added = 0
        ts = int(time.time() * 1000)
        lane = ""  # the lane whose bytes accumulate in lane_bytes
        lane_bytes = 0
        i = -1
        for topic, payload, pid, first in batch:
            i += 1
            route = routes.get(topic)
            if route is None:
                route = self._route(topic)
            size = route[2] + len(payload)
            if first & 1 or len(payload) > route[1] or added + size > room:
                break
            if route[0] is not lane:
                if lane_bytes:
                    pending_bytes[lane] = pending_bytes.get(lane, 0) + lane_bytes
                lane = route[0]
                lane_bytes = 0
            lane_bytes += size
            added += size
            append((lane, topic, payload, ts, pid))
        else:
            i = -1
        if lane_bytes:
            pending_bytes[lane] = pending_bytes.get(lane, 0) + lane_bytes
        st.used = used + added
        st.pending_size += added
        if len(pending) >= COMMIT_RECORDS or st.pending_size >= COMMIT_BYTES:
            self._batch_full(client)
        if i >= 0:
            self._each(batch, i)

    def _each(self, batch: list[RawPublish], start: int) -> None:
        on_message = self._on_message
        for p in batch[start:] if start else batch:
            on_message(raw_message(p))

    def _on_message(self, m: Message) -> None:
        """One message, every rule (the batch path's fallback)."""
        st = self.st
        client = self.client
        if client is None or st.closing:
            return
        topic = m.topic
        payload = m.payload
        route = self._routes.get(topic)
        if route is None:
            route = self._route(topic)
        lane, most, base = route
        size = base + len(payload)
        if (m.retain or len(payload) > most or self._redelivery or st.held
                or st.used + size > st.s.max_store_bytes):
            self._on_message_slow(m, lane, size, client)
            return
        # the common case: a new message that fits
        st.used += size
        pending_bytes = st.pending_bytes
        pending_bytes[lane] = pending_bytes.get(lane, 0) + size
        pending = st.pending
        if not pending:
            # the first of a batch wakes the committer (later ones find it awake)
            st.pending_since = time.monotonic()
            st.wake.set()
        pending.append((lane, topic, payload, int(time.time() * 1000), m.pid))
        st.pending_size += size
        if len(pending) >= COMMIT_RECORDS or st.pending_size >= COMMIT_BYTES:
            self._batch_full(client)

    def _batch_full(self, client: MQTTClient) -> None:
        st = self.st
        pending = st.pending
        st.full.set()
        if not self._paused and self._too_much(len(pending), st.pending_size):
            # Mosquitto 2.0.11 does not apply max_inflight_messages to a resumed session's
            # queue: stop reading until a commit made room (TCP holds the rest)
            self._paused = True
            client.pause_reading()

    def _too_much(self, pending: int, pending_size: int) -> bool:
        st = self.st
        return (pending + st.committing >= MAX_PENDING
                or pending_size + st.committing_size >= MAX_PENDING_BYTES)

    def _on_message_slow(self, m: Message, lane: str, size: int, client: MQTTClient) -> None:
        """Retained, too large, a possible redelivery, a lane holding messages, a full
        store: every rule checked in order."""
        st = self.st
        counters = st.counters
        if m.retain:
            # a retained message replayed by (re)subscribing is a snapshot, not a new event
            counters["retained_skipped"] += 1
            if m.qos:
                client.ack(m.pid)
            return
        if len(m.payload) > st.s.max_message_bytes:
            self._reject("oversize", m, client)
            return
        if not st.limits.record_fits(lane, m.topic, m.payload):
            self._reject("too_large_for_cloud", m, client)  # no frame the broker takes holds it
            return
        if self._redelivery and m.pid in self._candidates:
            if self._candidates[m.pid] == hash((m.topic, m.payload)):
                counters["redelivered_duplicates"] += 1
                client.ack(m.pid)
                return
        held = st.held.get(lane)
        if held:
            held.append(m)
            counters["held"] += 1
            return
        if st.used + size > st.s.max_store_bytes and not self._room_for(lane, size):
            if st.policy[lane] == "block":
                log.warning("lane %s is full: holding messages unacknowledged at the local broker", lane)
                st.held[lane] = deque([m])
                counters["held"] += 1
            else:
                st.drop(f"store_full:{lane}")
                if m.qos:
                    client.ack(m.pid)
            return
        st.used += size
        st.pending_bytes[lane] = st.pending_bytes.get(lane, 0) + size
        pending = st.pending
        if not pending:
            st.pending_since = time.monotonic()
        pending.append((lane, m.topic, m.payload, int(time.time() * 1000), m.pid))
        st.pending_size += size
        if len(pending) >= COMMIT_RECORDS or st.pending_size >= COMMIT_BYTES:
            self._batch_full(client)
        if not st.wake.is_set():
            st.wake.set()

    def _room_for(self, lane: str, size: int) -> bool:
        """Can the next commit make room by evicting telemetry? A drop_oldest lane may only
        evict its own oldest records; a block lane may evict any drop_oldest lane."""
        st = self.st
        over = st.used + size - st.s.max_store_bytes
        lanes = st.store.lanes
        pending = st.pending_bytes
        if st.policy[lane] == "drop_oldest":
            evictable = lanes[lane].bytes + pending.get(lane, 0)
        else:
            evictable = sum(ls.bytes + pending.get(n, 0) for n, ls in lanes.items()
                            if st.policy[n] == "drop_oldest")
        return evictable >= over

    def _reject(self, reason: str, m: Message, client: MQTTClient) -> None:
        st = self.st
        n = st.rejected.get(reason, 0) + 1
        st.rejected[reason] = n
        st.drop(f"rejected:{reason}")
        if n <= 10 or n % 1000 == 0:
            log.warning("rejected message on %r (%d bytes): %s (%d so far)", m.topic, len(m.payload), reason, n)
        if m.qos:
            client.ack(m.pid)

    # ------------------------------------------------------------ from the committer

    def took_batch(self) -> None:
        """The committer took the pending batch, or ended a commit: read again if we had
        paused and there is room."""
        st = self.st
        if self._paused and not self._too_much(len(st.pending), st.pending_size):
            self._paused = False
            if self.client is not None:
                self.client.resume_reading()

    def committed(self, client: MQTTClient | None, batch: list[Record], last_seq: int) -> None:
        """The batch is in the store: acknowledge it to the broker that delivered it."""
        st = self.st
        if client is not None and client is self.client and client.connected:
            pids = [r[4] for r in batch if r[4]]
            client.ack_many(pids)
            st.counters["acked_local"] += len(pids)
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
        self.st.confirmed_seq = max(self.st.confirmed_seq, last_seq)

    def release_held(self) -> None:
        """After a commit made room: move held messages of full block lanes into the batch."""
        st = self.st
        if not st.held or self.client is None:
            return
        for lane, held in list(st.held.items()):
            while held:
                m = held[0]
                size = len(m.topic) + len(m.payload) + RECORD_OVERHEAD
                if st.used + size > st.s.max_store_bytes and not self._room_for(lane, size):
                    break
                held.popleft()
                st.used += size
                st.pending_bytes[lane] = st.pending_bytes.get(lane, 0) + size
                if not st.pending:
                    st.pending_since = time.monotonic()
                st.pending_size += size
                st.pending.append((lane, m.topic, m.payload, int(time.time() * 1000), m.pid))
            if not held:
                del st.held[lane]
                log.info("lane %s has room again: accepting messages", lane)
        if st.pending:
            st.wake.set()
