"""Uplink: the store -> batch frames -> the cloud broker, and ingest's answers back.

The uplink keeps a persistent session on the cloud broker. Once connected it drains at
once, lane by lane in priority order, in sequence order, ``window`` frames in flight,
while the intake keeps storing new messages. A record leaves the store (a delete in the
committer's next transaction) only after ingest confirmed it (``confirm: ingest``:
retained acks on ``ef/<node>/ack``) or the cloud broker acknowledged its frame
(``confirm: broker``). Ingest may ask for a resend: after a gap it saw (``nack``), or
of everything unconfirmed when it lost its session (``hello``). What the gateway no
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


class Uplink:
    """The cloud broker session; :meth:`run` until the state's ``stop`` is set."""

    def __init__(self, state: State) -> None:
        self.st = state
        self.client: MQTTClient | None = None
        self._ring: UrlRing | None = None  # --cloud URLs, tried in turn

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
        while not st.stop.is_set():
            if client.closed.done():
                client.closed.result()
            st.uplink_wake.clear()
            if st.resend:
                # ingest lost its queue (new session): send again what it has not confirmed
                st.resend = False
                sent = {lane: st.delivered(lane) for lane in lane_order}
                st.rewind.clear()
                log.info("ingest started a new session: resending unconfirmed records")
            if st.rewind:
                # ingest saw a frame that did not follow what it holds: resend that lane,
                # after a gap notice for what is no longer here
                rewind, st.rewind = st.rewind, {}
                for lane, after in rewind.items():
                    if sent[lane] > after:
                        log.info("ingest asked to resend lane %s after seq %d", lane, after)
                        sent[lane] = await self._gap_notice(client, lane, after)
            while st.old_epoch_nacks:
                (epoch, lane), after = st.old_epoch_nacks.popitem()
                await self._send_gap(client, epoch, lane, after, frames.SEQ_MAX, None, "store re-created")
            progress = False
            deadline: float | None = None
            for name in lane_order:
                if lanes[name].newest_seq <= sent[name]:
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

    async def _gap_notice(self, client: MQTTClient, lane: str, after: int) -> int:
        """Before resending ``lane`` after ``after``: if records in between left the store
        unconfirmed, send a gap notice for them; return the seq the resend follows."""
        st = self.st
        first = await asyncio.get_running_loop().run_in_executor(st.reader, st.store.read, lane, after, 1, 1)
        before = first[0][0] if first else st.store.next_seq
        missing, upto, reason = st.ledger.missing(lane, after, before)
        if missing == 0 or upto <= after:
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
        st.counters["gap_records"] += missing or 0

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
