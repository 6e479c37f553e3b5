"""What the gateway's stages share: one object, read and written on the event loop.

The stages (gateway/intake.py -> gateway/committer.py -> gateway/uplink.py) never call
into each other's connections; they meet here:

* the batch that waits for the next group commit (``pending*``), filled by the intake
  and taken by the committer;
* the events that wake a stage (``wake``: the committer; ``uplink_wake``: the uplink)
  and say where it is (``idle``: no commit in flight);
* how far each lane got: ``acked`` (the cloud broker acknowledged its frame),
  ``ingested`` (ingest wrote it), ``confirmed_seq`` (the local broker has our PUBACKs),
  ``deleted`` (removed from the store);
* ``ledger``: what left the store without ingest's confirmation, for gap notices
  (gateway/gaps.py);
* the tail: the records of the last commits while the cloud is up, which the uplink
  sends without reading them back from SQLite (:meth:`State.remember`, :meth:`State.from_tail`);
* the counters and the status document that ``edgeferry gateway status`` and the
  metrics read.

The SQLite store's two threads live here too: ``writer`` (commits, the redelivery check)
and ``reader`` (the uplink's reads).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from edge.mqtt import Message
from gateway.gaps import Ledger
from gateway.profiles import CloudLimits
from gateway.settings import GatewaySettings
from gateway.store import RECORD_OVERHEAD, Store
from gateway.store import Record as StoreRecord
from gateway.topics import uplink_topic

__all__ = ["Hooks", "Record", "State"]

Record = tuple[str, str, bytes, int, int]
"""A message accepted for the next commit: (lane, topic, payload, ts_ms, packet id)."""


@dataclass(frozen=True)
class Hooks:
    """What a test injects into a gateway: failpoints (instants at which it fails) and
    test-only switches. Production passes none; tests/_failpoint_gateway.py builds a
    gateway process with them."""

    after_commit: Callable[[int], None] | None = None
    """Called by the committer after a commit that stored records and before they are
    acknowledged to the local broker, with the number of records. It may raise (the
    committer task fails with that exception) or kill the process."""

    downlink_after_receive: Callable[[int], None] | None = None
    """Called by the downlink once it stored new commands, before it acknowledges them
    to the cloud and delivers them, with their number (gateway/downlink.py)."""

    downlink_fast_status: bool = True
    """False: the downlink sends command statuses by the events lane only."""


class State:
    """The gateway's shared state (see the module docstring)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.s = settings
        self.store = Store(settings.store, settings.lanes, max_bytes=settings.max_store_bytes,
                           sync=settings.sync, node_id=settings.node_id)
        self.lane_order = [ln.name for ln in settings.lanes]
        self.policy = {ln.name: ln.when_full for ln in settings.lanes}
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()  # store open and the local broker connected (systemd READY=1)
        self.closing = False  # shutting down: take no new messages
        # the batch for the next group commit (intake -> committer)
        self.pending: list[Record] = []
        self.pending_bytes: dict[str, int] = {}
        self.pending_size = 0
        self.pending_since = 0.0
        # messages and bytes of the batch the writer thread is committing: in hand too
        self.committing = 0
        self.committing_size = 0
        self.full = asyncio.Event()  # the batch is big enough to commit at once
        self.used = 0  # record bytes in the store plus the pending batch
        self.held: dict[str, deque[Message]] = {}  # per block lane that is full: unacknowledged
        self.new_drops: dict[str, int] = {}
        self.drops_committing: dict[str, int] = {}
        # the committer
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()  # no commit in flight
        self.idle.set()
        self.last_delete = 0.0
        # how far each lane got (see the module docstring)
        self.confirmed_seq = 0
        self.acked: dict[str, int] = {}
        self.ingested: dict[str, int] = {}
        self.deleted: dict[str, int] = {}
        # the uplink
        self.uplink_wake = asyncio.Event()
        self.resend = False  # ingest lost its queue: send again what it has not confirmed
        self.rewind: dict[str, int] = {}  # per lane: ingest asked to resend after this seq
        self.rewind_held: dict[str, int] = {}  # per lane: ...and holds a frame that follows this one
        # nacks about a previous store (epoch, lane) -> after: answered with a gap notice
        self.old_epoch_nacks: dict[tuple[int, str], int] = {}
        self.ledger = Ledger({})  # made once the store is open (gateway.py)
        # per lane: the newest committed records (seq, ts, topic, payload) and the seq
        # after which the tail holds every record of the lane (see remember)
        self.tail: dict[str, deque[StoreRecord]] = {}
        self.tail_base: dict[str, int] = {}
        self.tail_records = 4 * settings.frame_max_records
        # links
        self.local_up = False
        self.cloud_up = False
        self.cloud_error: tuple[str, str] | None = None  # (kind, line) of the last failure
        # the cloud broker's limits: frame size, publish rate (gateway/profiles.py)
        self.limits = CloudLimits(settings.profile, settings.frame_max_bytes,
                                  partial(uplink_topic, settings.node_id), settings.node_id)
        self.offline_since: float | None = time.time()  # wall clock, for display
        self.online_mono: float | None = None  # when the cloud link came up (monotonic)
        self.offline_mono: float | None = time.monotonic()  # durations
        # counters (the persisted drops live in store.drops)
        self.counters: dict[str, int] = {
            "received": 0, "stored": 0, "acked_local": 0, "uplinked_records": 0, "frames": 0,
            "redelivered_duplicates": 0, "retained_skipped": 0, "held": 0, "commits": 0,
            "cloud_connects": 0, "local_connects": 0, "gap_notices": 0, "gap_records": 0,
            "resent_unconfirmed": 0,
        }
        self.rejected: dict[str, int] = {}

    def opened(self) -> None:
        """Take the store's figures once it is open."""
        self.used = self.store.total_bytes
        for lane in self.lane_order:
            self.acked[lane] = self.deleted[lane] = self.ingested[lane] = 0

    def remember(self, inserted: dict[str, list[StoreRecord]], first_seq: int, removed: bool) -> None:
        """The committer stored ``inserted`` (per lane, seqs from ``first_seq`` on): keep
        those records (the store's own tuples) for the uplink while the cloud is up. A
        commit that also evicted or expired records (``removed``), or a cloud that is
        down, empties the tail: the uplink then reads from the store, which is always right."""
        tail, base = self.tail, self.tail_base
        if removed or not self.cloud_up:
            tail.clear()
            base.clear()
            return
        for lane, recs in inserted.items():
            q = tail.get(lane)
            if q is None:
                # complete from here on: every later record of the lane is remembered
                q = tail[lane] = deque()
                base[lane] = first_seq - 1
            q.extend(recs)
        limit = self.tail_records
        for lane, q in tail.items():
            while len(q) > limit:  # the uplink is behind: it reads the older ones from the store
                base[lane] = q.popleft()[0]

    def from_tail(self, lane: str, after: int, max_records: int,
                  max_bytes: int) -> list[StoreRecord] | None:
        """What ``Store.read(lane, after, max_records, max_bytes)`` would return, from the
        tail; None when the tail cannot say (ask the store)."""
        q = self.tail.get(lane)
        if not q or after < self.tail_base[lane]:
            return None
        while q and q[0][0] <= after:  # sent: no longer needed here
            self.tail_base[lane] = q.popleft()[0]
        if not q:
            return None
        out: list[StoreRecord] = []
        total = 0
        for r in q:
            total += len(r[2]) + len(r[3]) + RECORD_OVERHEAD
            if out and (total > max_bytes or len(out) >= max_records):
                break
            out.append(r)
        return out

    def request_stop(self) -> None:
        self.stop.set()
        self.wake.set()
        self.uplink_wake.set()

    # ------------------------------------------------------------ the batch

    def discard_pending(self) -> None:
        """Forget messages not yet committed (their connection is gone: the broker
        redelivers them)."""
        for b in self.pending_bytes.values():
            self.used -= b
        self.pending = []
        self.pending_bytes = {}
        self.pending_size = 0

    def drop(self, reason: str) -> None:
        """Count one dropped message (persisted by the next commit)."""
        self.new_drops[reason] = self.new_drops.get(reason, 0) + 1
        self.wake.set()

    # ------------------------------------------------------------ progress

    def delivered(self, lane: str) -> int:
        """Highest seq of a lane that may leave the store."""
        if self.s.confirm == "ingest":
            return self.ingested[lane]
        return self.acked[lane]

    def due_deletes(self, force: bool = False) -> dict[str, int]:
        """Per lane, the seq up to which records may be removed (at most once a second
        unless ``force``): delivered, and the local broker has our acknowledgements."""
        now = time.monotonic()
        if not force and now - self.last_delete < 1.0:
            return {}
        out = {}
        for lane in self.acked:
            upto = min(self.delivered(lane), self.confirmed_seq)
            if upto > self.deleted[lane]:
                out[lane] = upto
        if out:
            self.last_delete = now
        return out

    # ------------------------------------------------------------ health

    def status(self) -> dict[str, Any]:
        lanes = {}
        for name, st in self.store.lanes.items():
            lanes[name] = {
                "records": st.count,
                "bytes": st.bytes,
                "oldest_age_s": None if (age := self.store.age_s(name)) is None else round(age, 3),
                "policy": st.spec.when_full,
                "held_at_broker": len(self.held.get(name, ())),
            }
        drops = dict(self.store.drops)
        for pending in (self.drops_committing, self.new_drops):
            for k, v in pending.items():
                drops[k] = drops.get(k, 0) + v
        return {
            "node_id": self.s.node_id,
            "epoch": self.store.epoch,
            "store": str(self.store.path),
            "running": True,
            "link": {"cloud": "up" if self.cloud_up else "down", "local": "up" if self.local_up else "down"},
            # why the cloud link is down: kind (tls_unknown_ca, tls_expired, tls_hostname,
            # tls_cert_refused, refused, unreachable, lost, ...) and the logged line
            "cloud_state": "up" if self.cloud_up else (self.cloud_error or ("down", ""))[0],
            "cloud_error": None if self.cloud_up or not self.cloud_error else self.cloud_error[1],
            "cloud_limits": self.limits.status(),
            "offline_since": self.offline_since,
            "offline_for_s": round(time.monotonic() - self.offline_mono, 3) if self.offline_mono else 0.0,
            "online_for_s": round(time.monotonic() - self.online_mono, 3)
            if self.cloud_up and self.online_mono else 0.0,
            "lanes": lanes,
            "store_bytes": self.used,
            "pending_commit": len(self.pending),
            "max_store_bytes": self.s.max_store_bytes,
            "drops": drops,
            "rejected": dict(self.rejected),
            "counters": dict(self.counters),
            "next_seq": self.store.next_seq,
        }
