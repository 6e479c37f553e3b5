"""What the gateway no longer holds, so that it can answer ingest's resend requests.

A record normally leaves the store only after ingest confirmed it (``--confirm
ingest``). Some leave before: under ``--confirm broker`` at the cloud broker's PUBACK
(a broker that then loses them, a kill -9 between autosaves, or one that acknowledges
without delivering), and under either mode when a lane's TTL expires them or a full
store evicts them. If ingest later asks for them (a nack: "resend lane L after seq A"),
the gateway answers with a gap notice for what it cannot resend (gateway/frames.py) and
then the records it still holds, so the lane goes on instead of stalling.

The :class:`Ledger` remembers, per lane and in ascending order, the sequence numbers of
records that left without ingest's confirmation, and why. Ingest's confirmations trim it
(what ingest holds can never be missing); beyond ``limit`` numbers per lane the oldest
are forgotten. It lives in memory: below what the store removed before this start
(``Store.removed_upto``, persisted per lane) or what was forgotten, it cannot tell how
many records a range held, and the gap notice says so (``missing`` unknown).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable

__all__ = ["Ledger", "BROKER_ACKED", "STORE_FULL", "TTL"]

BROKER_ACKED = "acknowledged by the cloud broker, not received by ingest"
TTL = "expired (lane TTL)"
STORE_FULL = "dropped (store full)"


class _Lane:
    __slots__ = ("seqs", "runs", "known_from")

    def __init__(self, known_from: int) -> None:
        self.seqs = array("q")
        self.runs: list[tuple[int, str]] = []  # (index into seqs where a reason starts, reason)
        self.known_from = known_from  # removals at or below this seq were not recorded


class Ledger:
    """Per lane: the records that left the store without ingest's confirmation."""

    def __init__(self, known_from: dict[str, int], limit: int = 100_000) -> None:
        """``known_from``: per lane, the highest seq about which nothing is known (at start:
        everything below the lane's oldest stored record)."""
        self.limit = limit
        self._lanes = {name: _Lane(k) for name, k in known_from.items()}

    def removed(self, lane: str, seqs: Iterable[int], reason: str) -> None:
        """Records of ``lane`` left the store (ascending seqs; ones recorded already are
        skipped)."""
        ln = self._lanes.get(lane)
        if ln is None:
            return
        a = ln.seqs
        last = a[-1] if a else ln.known_from
        start = len(a)
        a.extend(s for s in seqs if s > last)
        if len(a) > start and (not ln.runs or ln.runs[-1][1] != reason):
            ln.runs.append((start, reason))
        if len(a) > self.limit:
            self._cut(ln, len(a) - self.limit, forget=True)

    def confirmed(self, lane: str, upto: int) -> None:
        """Ingest holds every record of ``lane`` up to ``upto``: none of them can be missing."""
        ln = self._lanes.get(lane)
        if ln is None:
            return
        k = bisect.bisect_right(ln.seqs, upto)
        if k:
            self._cut(ln, k, forget=False)
        if upto > ln.known_from:
            ln.known_from = upto

    @staticmethod
    def _cut(ln: _Lane, k: int, *, forget: bool) -> None:
        if forget:
            ln.known_from = max(ln.known_from, ln.seqs[k - 1])
        del ln.seqs[:k]
        runs = [(max(0, i - k), r) for i, r in ln.runs]
        # keep the last run that starts at or before 0, and the later ones
        first = max((j for j, (i, _) in enumerate(runs) if i == 0), default=0)
        ln.runs = runs[first:] if ln.seqs else []

    def missing(self, lane: str, after: int, before: int) -> tuple[int | None, int, str]:
        """Records of ``lane`` with ``after < seq < before`` that left without ingest's
        confirmation: ``(count, highest seq, reason)``; count None when the ledger does not
        reach back to ``after`` (then highest is ``before - 1``). ``(0, after, "")`` when
        none are missing."""
        ln = self._lanes.get(lane)
        if ln is None:
            return None, before - 1, "unknown lane"
        a = ln.seqs
        i = bisect.bisect_right(a, after)
        j = bisect.bisect_left(a, before)
        if after < ln.known_from:
            return None, before - 1, self._reasons(ln, i, j) or "not known (gateway restarted)"
        if j <= i:
            return 0, after, ""
        return j - i, a[j - 1], self._reasons(ln, i, j)

    @staticmethod
    def _reasons(ln: _Lane, i: int, j: int) -> str:
        out: list[str] = []
        for n, (start, reason) in enumerate(ln.runs):
            end = ln.runs[n + 1][0] if n + 1 < len(ln.runs) else len(ln.seqs)
            if start < j and end > i and reason not in out:
                out.append(reason)
        return "; ".join(out)

    def size(self, lane: str) -> int:
        ln = self._lanes.get(lane)
        return len(ln.seqs) if ln is not None else 0
