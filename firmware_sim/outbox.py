"""A bounded in-memory outbox, as a microcontroller keeps one.

Every message a device publishes goes through it and leaves it only when the broker
acknowledged it (PUBACK). While the device is offline it keeps the newest ``limit``
messages: a new message beyond the limit pushes out the oldest, and the drop is counted
(telemetry drops are also recorded by stream and sequence number, for the manifest). On
reconnect every message still held is sent again, oldest first, including those that
were in flight when the link died: at least once, never silently lost.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import NamedTuple

__all__ = ["Entry", "Outbox", "SeqRanges"]

_BIG = 1 << 62


class Entry(NamedTuple):
    topic: str
    payload: bytes
    stream: str | None  # telemetry stream, None for events, garbage and replies
    seq: int  # data.seq of a telemetry reading, 0 otherwise


class SeqRanges:
    """Sorted, disjoint, closed integer ranges: a set of sequence numbers that costs one
    pair per gap, whatever the count (numbers mostly arrive in order)."""

    __slots__ = ("r",)

    def __init__(self, ranges: list[list[int]] | None = None) -> None:
        merged: list[list[int]] = []
        for lo, hi in sorted([int(a), int(b)] for a, b in ranges or ()):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.r = merged

    def add(self, n: int) -> bool:
        """Add ``n``; False if it was already there."""
        r = self.r
        if r and r[-1][1] + 1 == n:  # the common case: the next number
            r[-1][1] = n
            return True
        if not r or n > r[-1][1] + 1:
            r.append([n, n])
            return True
        i = bisect.bisect_right(r, [n, _BIG]) - 1  # the last range starting at or before n
        if i >= 0 and n <= r[i][1]:
            return False
        if i >= 0 and r[i][1] + 1 == n:
            r[i][1] = n
            if i + 1 < len(r) and r[i + 1][0] == n + 1:
                r[i][1] = r[i + 1][1]
                del r[i + 1]
            return True
        if i + 1 < len(r) and r[i + 1][0] == n + 1:
            r[i + 1][0] = n
            return True
        r.insert(i + 1, [n, n])
        return True

    def __contains__(self, n: int) -> bool:
        r = self.r
        i = bisect.bisect_right(r, [n, _BIG]) - 1
        return i >= 0 and n <= r[i][1]

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.r)

    def to_json(self) -> list[list[int]]:
        return [list(x) for x in self.r]


class Outbox:
    """Messages not yet acknowledged, oldest first, at most ``limit`` of them."""

    __slots__ = ("limit", "_items", "_unsent", "_next", "dropped", "drop_reasons", "dropped_seqs")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("an outbox holds at least one message")
        self.limit = limit
        self._items: dict[int, Entry] = {}
        self._unsent: deque[int] = deque()
        self._next = 0
        self.dropped = 0
        self.drop_reasons: dict[str, int] = {}
        self.dropped_seqs: dict[str, SeqRanges] = {}

    def __len__(self) -> int:
        return len(self._items)

    @property
    def pending(self) -> int:
        """Messages waiting to be sent (not in flight)."""
        return sum(1 for i in self._unsent if i in self._items)

    def put(self, entry: Entry) -> None:
        """Add a message; beyond the limit the oldest one is dropped (and counted)."""
        items = self._items
        if len(items) >= self.limit:
            oldest = next(iter(items))
            self._drop(items.pop(oldest), "outbox_full")
        self._next += 1
        items[self._next] = entry
        self._unsent.append(self._next)

    def next_unsent(self) -> tuple[int, Entry] | None:
        """The oldest message not sent on the current connection, marked as in flight."""
        unsent, items = self._unsent, self._items
        while unsent:
            key = unsent.popleft()
            entry = items.get(key)
            if entry is not None:
                return key, entry
        return None

    def ack(self, key: int) -> Entry | None:
        """The broker acknowledged it: it leaves the outbox."""
        return self._items.pop(key, None)

    def requeue_all(self) -> None:
        """The connection is gone: everything held is sent again on the next one."""
        self._unsent = deque(self._items)

    def clear(self, reason: str) -> int:
        """Lose everything held (power loss, reboot, shutdown), counted under ``reason``."""
        items, self._items = self._items, {}
        self._unsent.clear()
        for entry in items.values():
            self._drop(entry, reason)
        return len(items)

    def _drop(self, entry: Entry, reason: str) -> None:
        self.dropped += 1
        self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + 1
        if entry.stream is not None:
            ranges = self.dropped_seqs.get(entry.stream)
            if ranges is None:
                ranges = self.dropped_seqs[entry.stream] = SeqRanges()
            ranges.add(entry.seq)
