"""Cloud-side ingest: frames from every node -> decoded records -> a sink, exactly once.

Ingest holds one persistent QoS 1 session on the cloud broker. Frames are written to
the sink in groups (one write while the next group gathers), and acknowledged only
after the write returned, so a kill -9 of ingest loses nothing: the broker redelivers
what was not acknowledged and the sink drops what it already holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from edge._lifecycle import first_error
from edge.backoff import Backoff, connect_retrying, sleep_unless
from edge.errors import ConnectionLost
from edge.mqtt import Message, MQTTClient, parse_url
from gateway import frames
from gateway.cloudstate import CloudState, state_path
from gateway.cloudsync import CloudSync
from gateway.errors import FrameError
from gateway.frames import Gap
from gateway.settings import IngestSettings
from gateway.sinks import GapRow, JsonlSink, Records, SqliteSink, is_postgres, open_sink, read_gaps

if TYPE_CHECKING:
    from gateway.pgsink import PgSink
from gateway.topics import INGEST_HELLO, ack_topic, nack_topic, uplink_topic

__all__ = ["Ingest"]

log = logging.getLogger("edgeferry.ingest")

MAX_BATCH = 16
"""Frames decoded and written per sink write (up to 16,000 records by default)."""

MAX_BATCH_DB = 256
"""With a database sink: frames per transaction (small frames of many nodes: one
transaction's cost spread over more records), up to MAX_BATCH_DB_BYTES: a transaction
locks the lanes of its frames, and big ones made workers wait for each other (200 nodes'
frames of 100 records: 2 workers at half the rate of one with 256 frames a batch)."""

MAX_BATCH_DB_BYTES = 256 * 1024
MAX_BATCH_BYTES = 4 * 1024 * 1024

AHEAD_RECORDS = 50_000
"""File and SQLite sinks: records of frames that arrived ahead of a hole held in memory
until the gap notice or the resend fills it (beyond, such frames are dropped)."""

GAP_WAIT = 2.0
"""With a database sink: how long frames written ahead of a hole wait for it to fill
(frames of one lane reach several workers in any order) before ingest asks for a resend."""

Acks = dict[tuple[str, int], dict[str, int]]  # (node, epoch) -> lane -> high

DOWNLINK_TOPICS = ("evt/cmd/", "evt/shadow/")
"""Topics of the records ingest also applies to the cloud state (docs/commands.md)."""


def _from_sender(topic: str, node: str, lane: str) -> bool:
    """Does a frame's inner node and lane match its topic ``ef/<node>/up/<lane>``?"""
    return topic == uplink_topic(node, lane)


class Ingest:
    """``await Ingest(settings).run()`` until :meth:`stop` (SIGTERM) or a task fails."""

    def __init__(self, settings: IngestSettings) -> None:
        self.s = settings
        self.sink: JsonlSink | SqliteSink | PgSink | None = None
        self._db_sink = is_postgres(settings.sink)  # continuity decided by the database
        self._max_batch = MAX_BATCH_DB if self._db_sink else MAX_BATCH
        self._max_bytes = MAX_BATCH_DB_BYTES if self._db_sink else MAX_BATCH_BYTES
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sink")
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._batch: list[Message] = []
        self._client: MQTTClient | None = None
        self._ran = False
        self._nacked: dict[tuple[str, int, str], tuple[int, float]] = {}
        # frames that arrived ahead of a hole, per (node, epoch, lane), until it is filled
        self._ahead: dict[tuple[str, int, str], list[frames.Frame]] = {}
        self._ahead_records = 0
        self._paused = False
        self._confirming = False  # publishing confirmations: reading must go on (their PUBACKs)
        self.state: CloudState | None = None  # commands and shadows (docs/commands.md)
        self.sync: CloudSync | None = None
        self.counters = {"downlink_applied": 0, "frames": 0, "records": 0, "written": 0, "duplicates": 0,
                         "bad_frames": 0, "gap_frames": 0, "spoofed_frames": 0,
                         "connects": 0, "gaps": 0, "gap_records": 0, "gaps_unknown": 0}
        self.ready = asyncio.Event()  # sink open and the cloud broker connected (systemd READY=1)
        # per (node, lane): [gap notices recorded, records missing, notices of unknown size]
        self.gaps: dict[tuple[str, str], list[int]] = {}

    async def run(self, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Open the sink, consume until :meth:`stop`, then finish the write in flight and
        leave the broker; ``await ready()`` once started. The first task that fails ends
        ingest with that task's exception, raised as itself."""
        if self._ran:
            raise RuntimeError("an Ingest runs only once")
        self._ran = True
        if parse_url(self.s.cloud).password is not None:
            log.warning("the --cloud URL holds a password, which other processes can read "
                        "(ps, /proc): use --password-file")
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        try:
            self.sink = await loop.run_in_executor(self._pool, open_sink, self.s.sink, self.s.fsync)
            for g in await loop.run_in_executor(self._pool, read_gaps, self.s.sink):
                per = self.gaps.setdefault((str(g["node"]), str(g["lane"])), [0, 0, 0])
                per[0] += 1
                if g["missing"] is None:
                    per[2] += 1
                else:
                    per[1] += int(g["missing"])  # type: ignore[call-overload]
            if self.s.downlink:
                path = self.s.sink if self._db_sink else str(state_path(self.s.sink))
                self.state = await loop.run_in_executor(self._pool, CloudState.open, path)
                self.sync = CloudSync(self.s.cloud_urls or self.s.cloud, path, f"{self.s.client_id}-sync",
                                      keepalive=self.s.keepalive, backoff_max=self.s.backoff_max,
                                      tls=self.s.tls, password_file=self.s.password_file)
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._connection_loop(), name="ingest-connection"),
                        tg.create_task(self._writer(), name="ingest-writer"),
                    ]
                    if self._db_sink:
                        tasks.append(tg.create_task(self._hole_watch(), name="ingest-holes"))
                    if self.sync is not None:
                        tasks.append(tg.create_task(self.sync.run(self._stop), name="ingest-sync"))
                    if ready is not None:
                        await ready()
                    await self._stop.wait()
                    # the write in flight is acknowledged; the rest the broker redelivers
                    await self._idle.wait()
                    if self._client is not None and self._client.connected:
                        await self._client.close()
                    for t in tasks:
                        t.cancel()
            except BaseExceptionGroup as eg:  # noqa: F821 - builtin in 3.11
                error = first_error(eg)
            if error is not None:
                raise error  # the failed task's own exception and traceback
        finally:
            if self._client is not None:
                self._client.abort()  # when a task failed: no socket left open
            if self.sink is not None:
                await loop.run_in_executor(self._pool, self.sink.close)
            if self.state is not None:
                await loop.run_in_executor(self._pool, self.state.close)
            self._pool.shutdown(wait=True)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def _connection_loop(self) -> None:
        backoff = Backoff(0.2, self.s.backoff_max)

        def make() -> MQTTClient:
            self._batch = []
            self._paused = False
            # a worker of a group: a clean session, so that a dead or removed worker is no
            # longer handed frames (Mosquitto queues shared messages for an offline session)
            self._client = MQTTClient(clouds.next(), self.s.client_id, clean_session=bool(self.s.group),
                                      keepalive=self.s.keepalive, on_message=self._on_message,
                                      tls=tls, password_file=self.s.password_file)
            return self._client

        tls = self.s.tls
        clouds = self.s.clouds  # --cloud given more than once: the nodes, in turn
        while not self._stop.is_set():
            client = await connect_retrying(make, backoff, self._stop, "cloud broker", log)
            if client is None:
                break
            self.counters["connects"] += 1
            try:
                flt = f"$share/{self.s.group}/{self.s.filter}" if self.s.group else self.s.filter
                granted = await client.subscribe([(flt, 1)])
                if granted and granted[0] == 0x80:
                    log.error("the cloud broker refused the subscription to %r", flt)
                # gateways resend what we have not confirmed when our queue was lost
                hello = {"client_id": self.s.client_id, "session_present": client.session_present}
                await client.publish(INGEST_HELLO, json.dumps(hello).encode(), 1)
                log.info("ingest connected to %s, consuming %s", client.url, flt)
                self.ready.set()
                await client.closed
            except ConnectionLost as e:
                if not self._stop.is_set():
                    log.warning("cloud broker: %s", e)
            await self._idle.wait()
            if not self._stop.is_set():
                await self._sleep(backoff.next())

    def _on_message(self, m: Message) -> None:
        self._batch.append(m)
        if (len(self._batch) >= 2 * self._max_batch and not self._paused and not self._confirming
                and self._client is not None):
            self._paused = True  # enough in hand: let TCP hold the rest at the broker
            self._client.pause_reading()
        if not self._wake.is_set():
            self._wake.set()

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._batch:
                if self._stop.is_set():
                    return
                continue
            n, size = 0, 0
            for m in self._batch[:self._max_batch]:
                n += 1
                size += len(m.payload)
                if size >= self._max_bytes:
                    break
            batch, self._batch = self._batch[:n], self._batch[n:]
            if self._batch:
                self._wake.set()
            elif self._paused and self._client is not None:
                self._paused = False
                self._client.resume_reading()
            client = self._client
            self._idle.clear()
            try:
                while True:
                    try:
                        written, dups, acks, gaps = await loop.run_in_executor(
                            self._pool, self._process_db if self._db_sink else self._process, batch)
                        break
                    except OSError as e:
                        log.error("sink write failed (%s); retrying in 1 s", e)
                        await asyncio.sleep(1.0)
            finally:
                self._idle.set()
            self.counters["written"] += written
            self.counters["duplicates"] += dups
            if client is not None and client is self._client and client.connected:
                client.ack_many([m.pid for m in batch if m.qos])
                # confirmations wait for room in the publish window, which only PUBACKs
                # make: with reading paused (a full batch in hand) and one confirmation per
                # node, a batch of many nodes' frames stalled ingest for good (found with
                # 200 simulated gateways, bench/bench_fleet.py)
                self._confirming = True
                if self._paused:
                    self._paused = False
                    client.resume_reading()
                try:
                    await self._confirm(client, acks)
                    await self._nack(client, gaps)
                finally:
                    self._confirming = False
            # else: the broker redelivers them on the next connection; the sink drops them

    def _accepted(self, m: Message) -> frames.Frame | Gap | None:
        """The frame or gap notice in one message, or None (counted and logged) when it
        does not decode, or names another node or lane than its topic: the sender is who
        the topic says (the broker's ACL is per node), and such a frame is never written."""
        try:
            f = frames.decode_message(m.payload)
        except FrameError as e:
            self.counters["bad_frames"] += 1
            log.warning("dropped a bad frame on %r (%d bytes): %s", m.topic, len(m.payload), e)
            return None
        if not _from_sender(m.topic, f.node, f.lane):
            self.counters["spoofed_frames"] += 1
            n = self.counters["spoofed_frames"]
            if n <= 10 or n % 1000 == 0:
                log.warning("refused a frame on %r claiming node %r lane %r: the topic names "
                            "the sender (%d refused so far)", m.topic, f.node, f.lane, n)
            return None
        return f

    def _process(self, batch: list[Message]) -> tuple[int, int, Acks, dict[tuple[str, int, str], int]]:
        """Decode frames and write their records (in the sink thread). A frame that does
        not follow what the sink holds for its lane is not written (see ``gaps``)."""
        sink = self.sink
        assert isinstance(sink, JsonlSink | SqliteSink)
        groups: list[Records] = []
        down: list[Records] = []  # the frames that may hold command statuses or reports
        high = sink.high
        moved: dict[tuple[str, int, str], int] = {}
        gaps: dict[tuple[str, int, str], int] = {}
        gap_rows: list[GapRow] = []
        counters = self.counters
        ahead = self._ahead
        for m in batch:
            f = self._accepted(m)
            if f is None:
                continue
            node, epoch, lane = f.node, f.epoch, f.lane
            key = (node, epoch, lane)
            have = moved.get(key, high.get(key, 0))
            if isinstance(f, Gap):
                # the gateway no longer holds (after, upto]: count it, and go on after it
                if have >= f.upto:
                    continue  # recorded already (the notice came again)
                if f.after != have:
                    # ahead of what we hold, or from below it (an answer to an earlier
                    # request, whose count includes records held or counted since): ask
                    # from what we hold; that answer counts exactly what is missing
                    counters["gap_frames"] += 1
                    gaps[key] = have
                    continue
                gap_rows.append((node, epoch, lane, f.after, f.upto, f.missing, f.reason))
                moved[key] = f.upto
            elif f.prev_seq > have:
                # a frame before this one went missing: write nothing out of order, ask
                # the gateway to resend from what we hold, and keep this frame for when
                # the hole is filled or announced (under --confirm broker the gateway may
                # no longer hold it to resend: dropping it lost records the broker delivered)
                counters["gap_frames"] += 1
                if not self._hold(key, f):
                    gaps[key] = have
                continue
            else:
                counters["frames"] += 1
                counters["records"] += len(f.records)
                moved[key] = max(have, f.records[-1][0])
                groups.append((node, epoch, lane, f.records))
                if self._downlink_in(f):
                    down.append(groups[-1])
            if ahead and key in ahead:
                self._release(key, moved[key], groups, moved, down)
        for key in (*gaps, *ahead):  # ask for what follows all we hold (at most once a second, _nack)
            gaps[key] = moved.get(key, high.get(key, 0))
        written, dups = sink.write_records(groups)
        for g in gap_rows:
            if sink.write_gap(g):
                self._count_gap(g)
        high.update(moved)
        self._apply_downlink(down)
        acks: Acks = {}
        for node, epoch in {(k[0], k[1]) for k in moved}:
            acks[(node, epoch)] = {k[2]: v for k, v in high.items() if k[0] == node and k[1] == epoch}
        return written, dups, acks, gaps

    def _hold(self, key: tuple[str, int, str], f: frames.Frame) -> bool:
        """Keep a frame that arrived ahead of a hole (at most AHEAD_RECORDS records in all;
        beyond, False: it is dropped and the gateway's resend or gap notice answers for it)."""
        if self._ahead_records + len(f.records) > AHEAD_RECORDS:
            return False
        self._ahead.setdefault(key, []).append(f)
        self._ahead_records += len(f.records)
        return True

    def _release(self, key: tuple[str, int, str], have: int, groups: list[Records],
                 moved: dict[tuple[str, int, str], int], down: list[Records]) -> None:
        """The frames held for ``key`` that now follow what the sink holds, in order."""
        held = self._ahead[key]
        held.sort(key=lambda f: f.prev_seq)
        i = 0
        while i < len(held) and held[i].prev_seq <= have:
            f = held[i]
            i += 1
            self._ahead_records -= len(f.records)
            self.counters["frames"] += 1
            self.counters["records"] += len(f.records)
            have = max(have, f.records[-1][0])
            groups.append((f.node, f.epoch, f.lane, f.records))
            if self._downlink_in(f):
                down.append(groups[-1])
        moved[key] = have
        if i == len(held):
            del self._ahead[key]
        else:
            del held[:i]

    def _downlink_in(self, f: frames.Frame) -> bool:
        """May frame ``f`` hold records for the cloud state? (Its topic table says.)"""
        return self.state is not None and (not f.topics or any(t.startswith(DOWNLINK_TOPICS) for t in f.topics))

    def _apply_downlink(self, groups: list[Records]) -> None:
        if self.state is not None:
            # command statuses and reported state ride the events lane (docs/commands.md)
            down = [(node, r[2], r[3]) for node, _e, _lane, recs in groups for r in recs
                    if r[2].startswith(DOWNLINK_TOPICS)]
            if down:
                self.counters["downlink_applied"] += self.state.apply_records(down)

    def _process_db(self, batch: list[Message]) -> tuple[int, int, Acks, dict[tuple[str, int, str], int]]:
        """Decode frames and write them in one transaction of the database sink, which
        decides continuity and duplicates for every worker (gateway/pgsink.py)."""
        from gateway.pgsink import PgSink

        sink = self.sink
        assert isinstance(sink, PgSink)
        counters = self.counters
        batch_frames = []
        gap_rows: list[GapRow] = []
        down: list[Records] = []
        for m in batch:
            f = self._accepted(m)
            if f is None:
                continue
            if isinstance(f, Gap):  # (after, upto] is lost at the gateway: held, once recorded
                gap_rows.append((f.node, f.epoch, f.lane, f.after, f.upto, f.missing, f.reason))
                continue
            counters["frames"] += 1
            counters["records"] += len(f.records)
            batch_frames.append((f.node, f.epoch, f.lane, f.prev_seq, f.records))
            if self._downlink_in(f):
                down.append((f.node, f.epoch, f.lane, f.records))
        done = sink.write_frames(batch_frames, gap_rows)
        for g in done.new_gaps:
            self._count_gap(g)
        self._apply_downlink(down)
        return done.written, done.duplicates, done.acks, {}

    async def _hole_watch(self) -> None:
        """Database sink: ask for a resend of every hole open longer than GAP_WAIT."""
        from gateway.pgsink import PgSink

        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await self._sleep(GAP_WAIT / 2)
            client, sink = self._client, self.sink
            if client is None or not client.connected or not isinstance(sink, PgSink):
                continue
            try:
                holes = await loop.run_in_executor(self._pool, sink.waiting, GAP_WAIT)
            except OSError as e:
                log.error("cannot read the holes waiting: %s", e)
                continue
            self.counters["gap_frames"] += len(holes)
            await self._nack(client, holes)

    async def _confirm(self, client: MQTTClient, acks: Acks) -> None:
        """Tell each gateway (retained, QoS 1) the highest seq per lane that the sink holds
        with nothing missing before it, so the gateway can remove those records."""
        for (node, epoch), lanes in acks.items():
            body = json.dumps({"epoch": epoch, "lanes": lanes}).encode()
            try:
                await client.publish_nowait(ack_topic(node), body, 1, retain=True)
            except ConnectionLost:
                return

    async def _nack(self, client: MQTTClient, gaps: dict[tuple[str, int, str], int]) -> None:
        now = time.monotonic()
        if len(self._nacked) > 10_000:  # bounded with many nodes: forget the old asks
            self._nacked = {k: v for k, v in self._nacked.items() if now - v[1] < 1.0}
        for (node, epoch, lane), after in gaps.items():
            last = self._nacked.get((node, epoch, lane))
            if last is not None and last[0] == after and now - last[1] < 1.0:
                continue  # asked already; the resend is on its way
            self._nacked[(node, epoch, lane)] = (after, now)
            ask: dict[str, object] = {"epoch": epoch, "lane": lane, "after": after}
            held = self._ahead.get((node, epoch, lane))
            if held:  # the hole ends at most there: what follows is here (exact gap notices)
                ask["held_after"] = min(f.prev_seq for f in held)
            log.info("frame gap from %s lane %s after seq %d: asking for a resend%s", node, lane, after,
                     f" (keeping {len(held)} frames after seq {ask['held_after']})" if held else "")
            body = json.dumps(ask).encode()
            try:
                await client.publish_nowait(nack_topic(node), body, 1)
            except ConnectionLost:
                return

    async def _sleep(self, seconds: float) -> None:
        await sleep_unless(self._stop, seconds)

    def _count_gap(self, g: GapRow) -> None:
        node, epoch, lane, after, upto, missing, reason = g
        c = self.counters
        c["gaps"] += 1
        per = self.gaps.setdefault((node, lane), [0, 0, 0])
        per[0] += 1
        if missing is None:
            c["gaps_unknown"] += 1
            per[2] += 1
        else:
            c["gap_records"] += missing
            per[1] += missing
        log.warning("gap from %s lane %s (epoch %d): %s records after seq %d up to %s are lost at the "
                    "gateway (%s); writing what follows", node, lane, epoch,
                    "an unknown number of" if missing is None else missing, after,
                    "the end of that store" if upto == frames.SEQ_MAX else upto, reason)

    def status(self) -> dict[str, Any]:
        return {"sink": self.s.sink, "connected": bool(self._client and self._client.connected),
                "counters": dict(self.counters), "time": time.time(),
                "gaps": [{"node": node, "lane": lane, "notices": v[0], "records": v[1], "unknown": v[2]}
                         for (node, lane), v in sorted(self.gaps.items())]}
