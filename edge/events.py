"""CloudEvents 1.0 structured-mode envelopes, as specified in docs/events.md.

Light on purpose (no pydantic): devices, the simulator and the gateway may import it.
Ids are ULIDs: 48 bits of milliseconds, 80 more bits; sorting ids as text sorts them by
time. :func:`new_id` is monotonic within a process; :func:`derived_id` gives the same id
for the same (trigger, producer, n), so a handler that runs twice publishes the same ids.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from edge.errors import EnvelopeError

try:  # hashlib's blake2b is this one; importing hashlib would load OpenSSL (libcrypto)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import blake2b

__all__ = [
    "SPECVERSION",
    "Event",
    "decode",
    "derived_id",
    "encode",
    "envelope",
    "is_ulid",
    "new_id",
    "now_rfc3339",
    "rfc3339_ms",
    "ulid_ms",
]

SPECVERSION = "1.0"
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
_MAX80 = (1 << 80) - 1
_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


# every 10-bit value as its two Crockford base32 characters: ids are made per message
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _b32(n: int, chars: int) -> str:
    """``n`` as ``chars`` (even) Crockford base32 characters, most significant first."""
    pairs = _PAIRS
    return "".join([pairs[(n >> s) & 1023] for s in range(5 * chars - 10, -1, -10)])


def new_id() -> str:
    """A new ULID, strictly greater than every id this process made before."""
    global _last_ms, _last_rand
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            rand = _last_rand + 1
            if rand > _MAX80:  # 2**80 ids in one millisecond: borrow the next one
                ms += 1
                rand = int.from_bytes(os.urandom(10), "big") >> 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
        _last_ms, _last_rand = ms, rand
    return _b32(ms, 10) + _b32(rand, 16)


def is_ulid(s: object) -> bool:
    return (
        isinstance(s, str) and len(s) == 26 and s[0] in "01234567" and all(c in _DECODE for c in s)
    )


def ulid_ms(s: str) -> int:
    """The millisecond timestamp of a ULID."""
    n = 0
    for c in s[:10]:
        n = n * 32 + _DECODE[c]
    return n


def derived_id(trigger_id: str | None, producer: str, n: int) -> str:
    """The id of the n-th event ``producer`` publishes in reaction to ``trigger_id``:
    deterministic when the trigger is a ULID (its time part is kept), else a new id."""
    if trigger_id is None or not is_ulid(trigger_id.upper()):
        return new_id()
    trig = trigger_id.upper()
    h = blake2b(f"{trig}\x00{producer}\x00{n}".encode(), digest_size=10).digest()
    return trig[:10] + _b32(int.from_bytes(h, "big"), 16)


_second_prefix: dict[int, str] = {}


def rfc3339_ms(ts_ms: int) -> str:
    """Unix milliseconds as RFC 3339 UTC: ``2026-11-27T18:45:08.123Z`` (the part up to the
    second is formatted once per second, as timestamps are made per message)."""
    sec, ms = divmod(ts_ms, 1000)
    prefix = _second_prefix.get(sec)
    if prefix is None:
        if len(_second_prefix) > 4096:
            _second_prefix.clear()
        prefix = _second_prefix[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{prefix}.{ms:03d}Z"


def now_rfc3339() -> str:
    """Now, as RFC 3339 UTC with milliseconds: ``2026-11-27T18:45:08.123Z``."""
    return rfc3339_ms(time.time_ns() // 1_000_000)


def parse_time(s: str) -> float:
    """RFC 3339 -> Unix seconds (raises ValueError)."""
    dt = datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass(slots=True)
class Event:
    """A received event. For a raw payload ``id``, ``source`` and ``type`` are None and
    ``raw`` is True; ``data`` is the parsed JSON in both cases."""

    data: Any
    id: str | None = None
    source: str | None = None
    type: str | None = None
    time: str | None = None
    subject: str | None = None
    correlationid: str | None = None
    datacontenttype: str | None = None
    raw: bool = False
    extensions: dict[str, Any] | None = None

    @property
    def timestamp(self) -> float | None:
        """``time`` as Unix seconds, or None when absent or unreadable."""
        if not self.time:
            return None
        try:
            return parse_time(self.time)
        except ValueError:
            return None


_KNOWN = frozenset(
    (
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "datacontenttype",
        "correlationid",
        "data",
        "dataschema",
    )
)


def from_json(obj: Any) -> Event:
    """An :class:`Event` from parsed JSON (envelope or raw); raises :class:`EnvelopeError`."""
    if type(obj) is not dict or "specversion" not in obj:
        return Event(data=obj, raw=True)
    if obj["specversion"] != SPECVERSION:
        raise EnvelopeError(f"specversion must be '1.0', not {obj['specversion']!r}")
    for attr in ("id", "source", "type"):
        v = obj.get(attr)
        if not isinstance(v, str) or not v:
            raise EnvelopeError(f"envelope attribute {attr!r} must be a non-empty string")
    for attr in ("time", "subject", "correlationid", "datacontenttype"):
        v = obj.get(attr)
        if v is not None and not isinstance(v, str):
            raise EnvelopeError(f"envelope attribute {attr!r} must be a string")
    ext = None
    if len(obj) > 6:
        ext = {k: v for k, v in obj.items() if k not in _KNOWN} or None
    return Event(
        data=obj.get("data"),
        id=obj["id"],
        source=obj["source"],
        type=obj["type"],
        time=obj.get("time"),
        subject=obj.get("subject"),
        correlationid=obj.get("correlationid"),
        datacontenttype=obj.get("datacontenttype"),
        extensions=ext,
    )


def decode(payload: bytes) -> Event:
    """Parse one MQTT payload: raises :class:`EnvelopeError` (with ``reason``
    ``not_utf8``, ``invalid_json`` or ``bad_envelope``)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError("payload is not UTF-8", reason="not_utf8") from None
        raise EnvelopeError(f"payload is not JSON: {e}", reason="invalid_json") from None
    return from_json(obj)


def envelope(
    *,
    source: str,
    type: str,
    data: Any = None,
    id: str | None = None,
    subject: str | None = None,
    time: str | None = None,
    correlationid: str | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    """A CloudEvents 1.0 structured-mode envelope as a dict (see docs/events.md)."""
    eid = id or new_id()
    out: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": eid,
        "source": source,
        "type": type,
        "time": time or now_rfc3339(),
    }
    if subject is not None:
        out["subject"] = subject
    out["datacontenttype"] = "application/json"
    out["correlationid"] = correlationid or eid
    out.update(extensions)
    out["data"] = data
    return out


def encode(obj: Any) -> bytes:
    """JSON bytes (orjson; datetimes, dataclasses and UUIDs are understood)."""
    return orjson.dumps(obj)
