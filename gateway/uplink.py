"""Uplink: the store -> batch frames -> the cloud broker, and ingest's answers back.

The uplink keeps a persistent session on the cloud broker. Once connected it drains at
once, lane by lane in priority order, in sequence order, ``window`` frames in flight,
while the intake keeps storing new messages. A record leaves the store (a delete in the
committer's next transaction) only after ingest confirmed it (``confirm: ingest``:
retained acks on ``ef/<node>/ack``) or the cloud broker acknowledged its frame
(``confirm: broker``). Ingest may ask for a resend: after a gap it saw (``nack``), or
of everything unconfirmed when it lost its session (``hello``). A frame ingest has not
confirmed for ``resend_after`` seconds is sent again as it was (a worker of a shared
subscription that took it died without a restart: no nack and no hello will come for it);
at most ``window`` such frames, oldest first, once per ``resend_after``. What the gateway no
longer holds of a resend (records that left the store unconfirmed: ``st.ledger``,
gateway/gaps.py) is announced with a gap notice before the records it still has.

The cloud session is this stage's alone: the downlink stage (gateway/downlink.py) has
connections of its own, a clean session on the cloud so that no command with a stale
time to live can wait in the cloud broker's queue for it (docs/commands.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from functools import partial

from edge._tls import explain
from edge.backoff import Backoff, connect_retrying, sleep_unless
from edge.errors import ConnectError, ConnectionLost
from edge.mqtt import Message, MQTTClient
from gateway import frames
from gateway.gaps import BROKER_ACKED
from gateway.settings import UrlRing
from gateway.state import State
from gateway.topics import INGEST_HELLO, ack_topic, nack_topic, uplink_topic

__all__ = ["Uplink"]

log = logging.getLogger("edgeferry.gateway")

Inflight = tuple[int, "asyncio.Future[None]", list[int] | None]
"""A frame awaiting its PUBACK: highest seq, the PUBACK future, its seqs (confirm: broker)."""

Unconfirmed = list[float]
"""A frame sent and not yet confirmed by ingest (confirm: ingest): [sent at (monotonic),
first seq, highest seq, prev_seq]; per lane in seq order."""


class Uplink:
    """The cloud broker session; :meth:`run` until the state's ``stop`` is set."""

    def __init__(self, state: State) -> None:
        self.st = state
        self.client: MQTTClient | None = None
        self._ring: UrlRing | None = None  # --cloud URLs, tried in turn
        # per lane: the highest seq a gap notice of this store announced (counted once)
        self._announced: dict[str, int] = {}

    async def run(self) -> None:
        st, s = self.st, self.st.s
        backoff = Backoff(0.2, s.backoff_max)
        try:
            while not st.stop.is_set():
                client = await connect_retrying(self._new_client, backoff, st.stop, "cloud broker", log,
                                                on_error=self._failed)
                if client is None:
                    break
                await self._session(client)
                if not st.stop.is_set():
                    await sleep_unless(st.stop, backoff.next())
        finally:
            if self.client is not None:
                self.client.abort()  # when cancelled (another task failed): no socket left open

    def _new_client(self) -> MQTTClient:
        s = self.st.s
        if self._ring is None:
            self._ring = s.clouds
        self.client = MQTTClient(self._ring.next(), s.gateway_client_id, clean_session=False,
                                 keepalive=s.keepalive, max_inflight=s.window,
                                 on_message=self._on_message, tls=s.tls,
                                 password_file=s.password_file)
        return self.client

    def _failed(self, e: ConnectError) -> None:
        self.st.cloud_error = (explain(e)[0], str(e))  # the client's line names the kind already

    async def _session(self, client: MQTTClient) -> None:
        """One connection: subscribe to ingest's answers, drain until it closes."""
        st, s = self.st, self.st.s
        st.counters["cloud_connects"] += 1
        st.cloud_up = True
        st.cloud_error = None
        down_for = time.monotonic() - st.offline_mono if st.offline_mono else 0.0
        st.offline_since = st.offline_mono = None
        st.online_mono = time.monotonic()
        log.info("cloud broker %s connected after %.1f s offline; draining %d records",
                 client.url, down_for, sum(ln.count for ln in st.store.lanes.values()))
        client.closed.add_done_callback(lambda _: st.uplink_wake.set())
        st.limits.connected()
        try:
            # also under confirm: broker: ingest's resend requests get an answer (what is
            # still here, and a gap notice for the rest), and its acks trim the ledger
            await client.subscribe([(ack_topic(s.node_id), 1), (nack_topic(s.node_id), 1),
                                    (INGEST_HELLO, 1)])
            await self._drain(client)
        except ConnectionLost as e:
            why = client.closed.exception() if client.closed.done() else None
            log.warning("cloud link lost: %s", why or e)
            st.cloud_error = ("lost", str(why or e))
        finally:
            st.cloud_up = False
            st.offline_since, st.offline_mono = time.time(), time.monotonic()
            st.limits.lost()
            if st.stop.is_set():
                await client.close()
            else:
                client.abort()

    async def _drain(self, client: MQTTClient) -> None:
        """Send frames while the connection lasts: the window loop."""
        st, s = self.st, self.st.s
        loop = asyncio.get_running_loop()
        lane_order = st.lane_order
        sent = {lane: st.delivered(lane) for lane in lane_order}
        st.resend = False
        inflight: dict[str, deque[Inflight]] = {n: deque() for n in lane_order}
        # under confirm: broker a frame's records leave the store at its PUBACK: the
        # ledger keeps their seqs until ingest confirms them (gap notices, gaps.py)
        keep_seqs = s.confirm == "broker"
        linger_ms = int(s.frame_linger * 1000)
        compress = s.compress == "zstd"
        store = st.store
        lanes = store.lanes
        limits = st.limits
        resend_after = s.resend_after if s.confirm == "ingest" else 0.0
        unconfirmed: dict[str, deque[Unconfirmed]] = {n: deque() for n in lane_order}
        # per lane being resent after a nack: up to where ingest may lack what was sent;
        # records of that range that leave the store meanwhile get a gap notice of their own
        resending: dict[str, int] = {}
        next_pass: float | None = None  # when the resend timer looks at them next
        while not st.stop.is_set():
            if client.closed.done():
                client.closed.result()
            st.uplink_wake.clear()
            if st.resend:
                # ingest lost its queue (new session): send again what it has not confirmed
                st.resend = False
                sent = {lane: st.delivered(lane) for lane in lane_order}
                st.rewind.clear()
                st.rewind_held.clear()
                resending.clear()
                for q in unconfirmed.values():
                    q.clear()
                log.info("ingest started a new session: resending unconfirmed records")
            if st.rewind:
                # ingest saw a frame that did not follow what it holds: resend that lane,
                # after a gap notice for what is no longer here
                rewind, st.rewind = st.rewind, {}
                held, st.rewind_held = st.rewind_held, {}
                for lane, after in rewind.items():
                    if sent[lane] > after:
                        log.info("ingest asked to resend lane %s after seq %d", lane, after)
                        # what ingest may lack: up to what it holds ahead (its nack says), or
                        # everything sent
                        stop = min(sent[lane], held.get(lane, sent[lane]))
                        sent[lane] = await self._gap_notice(client, lane, after, held.get(lane))
                        if sent[lane] < stop:
                            resending[lane] = max(stop, resending.get(lane, stop))
                        q = unconfirmed[lane]
                        while q and q[-1][2] > sent[lane]:  # sent again by the loop below
                            q.pop()
            while st.old_epoch_nacks:
                (epoch, lane), after = st.old_epoch_nacks.popitem()
                await self._send_gap(client, epoch, lane, after, frames.SEQ_MAX, None, "store re-created")
            if next_pass is not None and time.monotonic() >= next_pass:
                next_pass = await self._resend_unconfirmed(client, unconfirmed, resend_after)
            progress = False
            deadline: float | None = None
            if next_pass is not None:
                deadline = max(0.0, next_pass - time.monotonic())
            for name in lane_order:
                if lanes[name].newest_seq <= sent[name]:
                    if name in resending:  # nothing left to resend: announce what is gone
                        sent[name] = await self._resend_gap(client, name, sent[name], None, resending.pop(name))
                    continue
                wait, lost_after = limits.probe_wait(name)  # cautious mode (profiles.py)
                if lost_after is not None:
                    st.rewind[name] = min(lost_after, st.rewind.get(name, lost_after))
                    progress = True
                    continue
                if wait:
                    deadline = wait if deadline is None else min(deadline, wait)
                    continue
                cap = limits.cap(name)
                rows = st.from_tail(name, sent[name], s.frame_max_records, cap)
                if rows is None:  # not among the last commits: read back from the store
                    rows = await loop.run_in_executor(
                        st.reader, store.read, name, sent[name], s.frame_max_records, cap)
                if name in resending:
                    # records of the resend that left the store since the last read (the
                    # cloud broker's PUBACK, TTL, eviction): a gap notice before these rows
                    stop = resending[name]
                    sent[name] = await self._resend_gap(client, name, sent[name], rows[0][0] if rows else None, stop)
                    if not rows or rows[-1][0] >= stop:
                        del resending[name]
                if not rows:  # evicted or expired meanwhile
                    sent[name] = max(sent[name], lanes[name].newest_seq)
                    continue
                if len(rows) < s.frame_max_records and any(inflight.values()):
                    age = int(time.time() * 1000) - rows[0][1]
                    if 0 <= age < linger_ms:  # (a wall-clock jump back: send, not wait)
                        wait = (linger_ms - age) / 1000
                        deadline = wait if deadline is None else min(deadline, wait)
                        continue
                frame, rows = limits.fit(name, rows, partial(
                    frames.encode, s.node_id, store.epoch, name, compress=compress, prev_seq=sent[name]))
                await limits.take()
                fut = await client.publish_nowait(uplink_topic(s.node_id, name), frame, 1)
                assert fut is not None
                hi = rows[-1][0]
                limits.frame_sent(len(frame), name, rows[0][0], hi)
                if resend_after:
                    now = time.monotonic()
                    unconfirmed[name].append([now, rows[0][0], hi, sent[name]])
                    if next_pass is None:
                        next_pass = now + resend_after
                sent[name] = hi
                inflight[name].append((hi, fut, [r[0] for r in rows] if keep_seqs else None))
                fut.add_done_callback(partial(self._frame_acked, name, inflight[name], len(rows)))
                st.counters["frames"] += 1
                progress = True
            if progress:
                continue
            try:
                async with asyncio.timeout(deadline):
                    await st.uplink_wake.wait()
            except TimeoutError:
                pass

    async def _resend_unconfirmed(self, client: MQTTClient, unconfirmed: dict[str, deque[Unconfirmed]],
                                  resend_after: float) -> float | None:
        """The resend timer's pass: send again, as they were, the frames ingest has not
        confirmed for ``resend_after`` (at most ``window``, oldest first); return when
        the next pass is due (None: nothing unconfirmed)."""
        st, s = self.st, self.st.s
        now = time.monotonic()
        due: list[tuple[float, str, Unconfirmed]] = []
        for lane, q in unconfirmed.items():
            while q and q[0][2] <= st.ingested[lane]:  # confirmed meanwhile
                q.popleft()
            due.extend((e[0], lane, e) for e in q if e[0] <= now - resend_after)
        due.sort(key=lambda d: d[0])
        loop = asyncio.get_running_loop()
        for _, lane, e in due[:s.window]:
            _, first, hi, prev = int(e[0]), int(e[1]), int(e[2]), int(e[3])
            rows = await loop.run_in_executor(st.reader, st.store.read, lane, prev, s.frame_max_records, 2**31)
            rows = [r for r in rows if r[0] <= hi]
            if not rows or rows[0][0] != first or rows[-1][0] != hi:
                # some of it left the store meanwhile: the rewind answers with a gap notice
                st.rewind[lane] = min(prev, st.rewind.get(lane, prev))
                st.uplink_wake.set()
                continue
            frame = frames.encode(s.node_id, st.store.epoch, lane, rows, compress=s.compress == "zstd",
                                  prev_seq=prev)
            await st.limits.take()
            await client.publish_nowait(uplink_topic(s.node_id, lane), frame, 1)
            e[0] = time.monotonic()
            st.counters["resent_unconfirmed"] += 1
        if due:
            log.warning("resent %d frames that ingest had not confirmed for %.1f s (%d waiting; oldest: "
                        "lane %s seqs %d-%d)", min(len(due), s.window), resend_after, len(due),
                        due[0][1], int(due[0][2][1]), int(due[0][2][2]))
        oldest = min((e[0] for q in unconfirmed.values() for e in q), default=None)
        if oldest is None:
            return None
        return max(oldest + resend_after, now + resend_after if due else now)

    async def _gap_notice(self, client: MQTTClient, lane: str, after: int, held: int | None) -> int:
        """Before resending ``lane`` after ``after``: if records in between left the store
        unconfirmed, send a gap notice for them; return the seq the resend follows.
        ``held``: ingest holds a frame that follows this seq (the gap ends there at most)."""
        st = self.st
        first = await asyncio.get_running_loop().run_in_executor(st.reader, st.store.read, lane, after, 1, 1)
        before = first[0][0] if first else st.store.next_seq
        if held is not None:
            before = min(before, held + 1)
        missing, upto, reason = st.ledger.missing(lane, after, before)
        if missing == 0 or upto <= after:
            return after
        await self._send_gap(client, st.store.epoch, lane, after, upto, missing, reason)
        return upto

    async def _resend_gap(self, client: MQTTClient, lane: str, after: int, first: int | None, stop: int) -> int:
        """During a resend up to ``stop``: a gap notice for the records after ``after``
        and before ``first`` (the next row read; None: none) that left the store
        unconfirmed since; return the seq the next frame follows."""
        st = self.st
        before = stop + 1 if first is None else min(first, stop + 1)
        missing, upto, reason = st.ledger.missing(lane, after, before)
        if not missing or upto <= after:  # (unknown: the first notice of the resend said so)
            return after
        await self._send_gap(client, st.store.epoch, lane, after, upto, missing, reason)
        return upto

    async def _send_gap(self, client: MQTTClient, epoch: int, lane: str, after: int, upto: int,
                        missing: int | None, reason: str) -> None:
        st, s = self.st, self.st.s
        log.warning("lane %s: ingest asked for records after seq %d that are no longer here: %s "
                    "records up to seq %s (%s); sending a gap notice", lane, after,
                    "an unknown number of" if missing is None else missing,
                    f"the end of store epoch {epoch}" if upto == frames.SEQ_MAX else upto, reason)
        body = frames.encode_gap(s.node_id, epoch, lane, after, upto, missing, reason)
        await st.limits.take()  # the cloud's publish rate counts it like a frame
        await client.publish_nowait(uplink_topic(s.node_id, lane), body, 1)
        st.counters["gap_notices"] += 1
        new = missing or 0
        if epoch == st.store.epoch and new:
            # a repeated request gets the same answer, or one reaching further: count
            # only the records no notice announced before
            announced = self._announced.get(lane, 0)
            if after < announced:
                new = (st.ledger.missing(lane, announced, upto + 1)[0] or 0) if upto > announced else 0
            self._announced[lane] = max(upto, announced)
        st.counters["gap_records"] += new

    def _frame_acked(self, lane: str, q: deque[Inflight], n: int, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        st = self.st
        st.limits.frame_acked()
        st.counters["uplinked_records"] += n
        while q and q[0][1].done() and not q[0][1].cancelled() and q[0][1].exception() is None:
            hi, _, seqs = q.popleft()
            if hi > st.acked[lane]:
                st.acked[lane] = hi
            if seqs:
                st.ledger.removed(lane, seqs, BROKER_ACKED)
        st.uplink_wake.set()

    # ------------------------------------------------------------ from the cloud

    def _on_message(self, m: Message) -> None:
        st = self.st
        client = self.client
        if m.qos and client is not None:
            client.ack(m.pid)
        if m.topic == INGEST_HELLO:
            try:
                hello = json.loads(m.payload)
            except ValueError:
                return
            if isinstance(hello, dict) and not hello.get("session_present", True):
                st.resend = True
                st.uplink_wake.set()
            return
        try:
            ack = json.loads(m.payload)
            if int(ack["epoch"]) != st.store.epoch:
                if m.topic.endswith("/nack") and 0 <= int(ack["after"]) < frames.SEQ_MAX:
                    # about a previous store of this node: none of it is here any more
                    key = (int(ack["epoch"]), str(ack["lane"]))
                    if key in st.old_epoch_nacks or len(st.old_epoch_nacks) < 64:
                        st.old_epoch_nacks[key] = min(int(ack["after"]), st.old_epoch_nacks.get(key, 2**63))
                        st.uplink_wake.set()
                return
            if m.topic.endswith("/nack"):
                lane, after = str(ack["lane"]), int(ack["after"])
                if lane in st.ingested:
                    st.limits.nacked(lane, after)  # a frame the broker dropped? (profiles.py)
                    st.rewind[lane] = min(after, st.rewind.get(lane, after))
                    held = ack.get("held_after")
                    if held is not None and int(held) > after:  # ingest holds what follows it
                        st.rewind_held[lane] = min(int(held), st.rewind_held.get(lane, int(held)))
                    st.uplink_wake.set()
                return
            for lane, seq in ack["lanes"].items():
                if lane in st.ingested and int(seq) > st.ingested[lane]:
                    st.ingested[lane] = int(seq)
                    st.ledger.confirmed(lane, int(seq))
                    st.limits.confirmed(lane, int(seq))
                    if st.limits.probe_done:  # a probe frame got through: next frame now
                        st.limits.probe_done = False
                        st.uplink_wake.set()
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignored a malformed ingest ack on %r", m.topic)
