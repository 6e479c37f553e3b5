"""Committer: the pending batch -> one SQLite transaction -> acknowledgements.

At most one transaction per ``commit_interval`` (sooner when the batch is large): the
new records of the intake's batch, removal of records the cloud side confirmed,
evictions when the store is full, TTL expiry, and the drop counters. The transaction
runs in the store's writer thread; once it returns, the batch goes back to the intake
(gateway/intake.py) to be acknowledged to the local broker, and the uplink
(gateway/uplink.py) is woken to send the new records.
"""

from __future__ import annotations

import asyncio
import logging
import time

from edge.backoff import sleep_unless
from gateway.gaps import STORE_FULL, TTL
from gateway.intake import Intake
from gateway.state import Hooks, State

__all__ = ["Committer"]

log = logging.getLogger("edgeferry.gateway")


class Committer:
    """Group commits; :meth:`run` until cancelled, :meth:`housekeeping` until stop."""

    def __init__(self, state: State, intake: Intake, hooks: Hooks) -> None:
        self.st = state
        self._intake = intake
        self._hooks = hooks

    async def run(self) -> None:
        st = self.st
        store = st.store
        loop = asyncio.get_running_loop()
        interval = st.s.commit_interval
        while True:
            await st.wake.wait()
            st.wake.clear()
            # group commit: wait until the batch is big enough or its oldest message has
            # waited commit_interval (fewer, larger commits write less to flash)
            while st.pending and not st.full.is_set() and not st.closing:
                wait = st.pending_since + interval - time.monotonic()
                if wait <= 0:
                    break
                try:
                    async with asyncio.timeout(wait):
                        await st.full.wait()
                except TimeoutError:
                    break
            st.full.clear()
            if st.closing:
                continue
            deletes = st.due_deletes()
            if not st.pending and not deletes and not st.new_drops:
                continue
            client = self._intake.client  # the connection that delivered this batch
            batch, st.pending = st.pending, []
            batch_bytes, st.pending_bytes = st.pending_bytes, {}
            st.committing, st.committing_size = len(batch), st.pending_size
            st.pending_size = 0
            self._intake.took_batch()
            drops, st.new_drops = st.new_drops, {}
            st.drops_committing = drops  # still shown by status() until committed
            st.idle.clear()
            try:
                res = await loop.run_in_executor(st.writer, store.commit, batch, deletes, drops)
            except Exception as e:  # disk full, I/O error: keep the batch, try again
                st.committing = st.committing_size = 0
                st.drops_committing = {}
                log.error("store commit failed (%s); retrying", e)
                st.pending[:0] = batch
                for k, v in batch_bytes.items():
                    st.pending_bytes[k] = st.pending_bytes.get(k, 0) + v
                    st.pending_size += v
                for k, v in drops.items():
                    st.new_drops[k] = st.new_drops.get(k, 0) + v
                st.idle.set()
                await asyncio.sleep(1.0)
                st.wake.set()
                continue
            st.committing = st.committing_size = 0
            self._intake.took_batch()
            st.drops_committing = {}
            st.counters["commits"] += 1
            for lane, upto in deletes.items():
                st.deleted[lane] = upto
            for part in (res.deleted, res.evicted, res.expired):
                for _, (_, b) in part.items():
                    st.used -= b
            if res.evicted:
                log.warning("store full: evicted %s", {k: v[0] for k, v in res.evicted.items()})
            for lane, seqs in res.evicted_seqs.items():
                st.ledger.removed(lane, seqs, STORE_FULL)
            for lane, seqs in res.expired_seqs.items():
                st.ledger.removed(lane, seqs, TTL)
            st.remember(res.inserted, res.first_seq, bool(res.evicted or res.expired))
            if batch:
                st.counters["stored"] += len(batch)
                if self._hooks.after_commit is not None:
                    self._hooks.after_commit(len(batch))
                self._intake.committed(client, batch, res.last_seq)
                st.uplink_wake.set()
            st.idle.set()
            self._intake.release_held()

    async def housekeeping(self) -> None:
        """Once a second: wake the committer when records may leave the store or expire."""
        st = self.st
        while not st.stop.is_set():
            await sleep_unless(st.stop, 1.0)
            if any(st.delivered(n) > st.deleted[n] for n in st.acked) or any(
                ln.spec.ttl for ln in st.store.lanes.values()
            ):
                st.wake.set()
            if st.s.confirm == "ingest":
                for lane in st.limits.watch_confirmations(st.acked, st.ingested):
                    # frames lost after the broker's acknowledgement: resend, smaller
                    st.rewind[lane] = min(st.ingested[lane], st.rewind.get(lane, st.ingested[lane]))
                    st.uplink_wake.set()

    async def flush_deletes(self) -> None:
        """Remove what the cloud side confirmed (at shutdown, so a restart does not
        resend it)."""
        st = self.st
        deletes = st.due_deletes(force=True)
        if deletes:
            await asyncio.get_running_loop().run_in_executor(st.writer, st.store.commit, [], deletes, {})
