"""Batch frames: many stored records in one cloud MQTT message (docs/wire-format.md).

Layout, little-endian::

    "EF"  version:u8  flags:u8  epoch:u64  prev_seq:u64  base_seq:u64  count:u32
    node_len:u8 node  lane_len:u8 lane
    body (zstd-compressed when flags & 1):
        topic_count:u16  (topic_len:u16 topic)*
        (seq_delta:u32 ts_ms:i64 topic_index:u16 payload_len:u32 payload)*count

``seq = base_seq + seq_delta``. Records of one frame belong to one lane and are in
sequence order.

A *gap notice* travels on the same topic, so it arrives in order with the frames::

    "EG"  version:u8  flags:u8  epoch:u64  after:u64  upto:u64  missing:u32
    node_len:u8 node  lane_len:u8 lane  reason_len:u8 reason

It says: this gateway no longer holds the lane's records with ``after < seq <= upto``
(``missing`` of them; 0xFFFFFFFF: it cannot tell how many), for ``reason``. The receiver
counts them as lost and writes the frames that follow ``upto``.

``prev_seq`` is the lane's sequence number a frame follows: the receiver writes a frame
only when it already holds everything up to ``prev_seq`` (else a frame was lost on the
way, and it asks for a resend). A decoder refuses an unknown version rather than
guessing.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.errors import FrameError

Row = tuple[int, int, str, bytes] | tuple[int, int, str, bytes, int]
"""A record to encode: (seq, ts ms, topic, payload), or the store's record with its packet id."""

__all__ = ["FRAME_VERSION", "Frame", "Gap", "decode", "decode_message", "encode", "encode_gap"]

FRAME_VERSION = 1
FLAG_ZSTD = 1
MAX_RECORDS = 65535

_HEAD = struct.Struct("<2sBBQQQI")
_GAP = struct.Struct("<2sBBQQQI")  # magic, version, flags, epoch, after, upto, missing
GAP_VERSION = 1
MISSING_UNKNOWN = 0xFFFFFFFF
SEQ_MAX = 2**63 - 1  # a gap notice's upto when a whole store epoch is gone
_REC = struct.Struct("<IqHI")
_U16 = struct.Struct("<H")


@dataclass(slots=True)
class Frame:
    """A decoded frame; ``records`` are ``(seq, ts_ms, topic, payload)``; ``topics`` the
    frame's topic table (every topic its records name; empty: not known)."""

    node: str
    epoch: int
    lane: str
    records: list[tuple[int, int, str, bytes]]
    prev_seq: int = 0
    topics: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Gap:
    """A gap notice: the lane's records in ``(after, upto]`` are gone from the gateway
    (``missing`` of them, None when it cannot tell), because of ``reason``."""

    node: str
    epoch: int
    lane: str
    after: int
    upto: int
    missing: int | None
    reason: str


def pack_topics(topics: dict[str, int]) -> bytes:
    """A topic table: u16 count, then (u16 length, UTF-8) per topic, in index order."""
    parts = [_U16.pack(len(topics))]
    for topic in topics:
        t = topic.encode()
        parts.append(_U16.pack(len(t)))
        parts.append(t)
    return b"".join(parts)


def read_topics(data: bytes, pos: int = 0) -> tuple[list[str], int]:
    """Read a topic table at ``pos``; return the topics and the position after it."""
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    topics = []
    for _ in range(count):
        (tlen,) = _U16.unpack_from(data, pos)
        topics.append(data[pos + 2 : pos + 2 + tlen].decode())
        pos += 2 + tlen
    return topics, pos


def _zstd():  # imported only when compression is used
    try:
        import zstandard
    except ImportError:  # pragma: no cover - depends on the installation
        raise FrameError("zstd compression needs the 'zstandard' package") from None
    return zstandard


def encode(
    node: str, epoch: int, lane: str, records: Sequence[Row],
    compress: bool = False, prev_seq: int = 0,
) -> bytes:
    """Encode records ``(seq, ts_ms, topic, payload)`` (ascending seq, all above
    ``prev_seq``; a fifth item, the store's packet id, is ignored) into one frame."""
    if not records:
        raise ValueError("a frame holds at least one record")
    if len(records) > MAX_RECORDS:
        raise ValueError(f"a frame holds at most {MAX_RECORDS} records")
    base = records[0][0]
    if prev_seq >= base:
        raise ValueError("prev_seq must be below the first record's seq")
    topics: dict[str, int] = {}
    parts: list[bytes] = []
    pack = _REC.pack
    for r in records:
        topic = r[2]
        idx = topics.get(topic)
        if idx is None:
            idx = topics[topic] = len(topics)
        payload = r[3]
        parts.append(pack(r[0] - base, r[1], idx, len(payload)))
        parts.append(payload)
    body = pack_topics(topics) + b"".join(parts)
    flags = 0
    if compress:
        body = _zstd().ZstdCompressor(level=1).compress(body)
        flags |= FLAG_ZSTD
    n = node.encode()
    ln = lane.encode()
    return b"".join((
        _HEAD.pack(b"EF", FRAME_VERSION, flags, epoch, prev_seq, base, len(records)),
        bytes((len(n),)), n, bytes((len(ln),)), ln, body,
    ))


def decode(data: bytes) -> Frame:
    """Decode a frame, raising :class:`FrameError` for anything malformed."""
    try:
        magic, version, flags, epoch, prev_seq, base, count = _HEAD.unpack_from(data, 0)
    except struct.error:
        raise FrameError(f"frame too short ({len(data)} bytes)") from None
    if magic != b"EF":
        raise FrameError("not an edgeferry frame (bad magic)")
    if version != FRAME_VERSION:
        raise FrameError(f"unsupported frame version {version}")
    try:
        pos = _HEAD.size
        nlen = data[pos]
        node = data[pos + 1 : pos + 1 + nlen].decode()
        pos += 1 + nlen
        llen = data[pos]
        lane = data[pos + 1 : pos + 1 + llen].decode()
        pos += 1 + llen
        body = data[pos:]
        if flags & FLAG_ZSTD:
            body = _zstd().ZstdDecompressor().decompress(body, max_output_size=1 << 30)
        topics, pos = read_topics(body)
        records = []
        unpack = _REC.unpack_from
        rsize = _REC.size
        blen = len(body)
        for _ in range(count):
            delta, ts, idx, plen = unpack(body, pos)
            pos += rsize
            end = pos + plen
            if end > blen:
                raise FrameError("frame truncated")
            records.append((base + delta, ts, topics[idx], bytes(body[pos:end])))
            pos = end
        if pos != blen:
            raise FrameError(f"{blen - pos} stray bytes after the last record")
    except FrameError:
        raise
    except Exception as e:  # struct.error, IndexError, UnicodeDecodeError, zstd errors
        raise FrameError(f"corrupt frame: {e}") from None
    return Frame(node, epoch, lane, records, prev_seq, topics)


def _short(name: str, s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise ValueError(f"{name} longer than 255 bytes")
    return bytes((len(b),)) + b


def encode_gap(node: str, epoch: int, lane: str, after: int, upto: int, missing: int | None,
               reason: str) -> bytes:
    """Encode a gap notice (see the module docstring)."""
    if not 0 <= after < upto <= SEQ_MAX:
        raise ValueError("a gap needs 0 <= after < upto")
    if missing is not None and not 0 <= missing < MISSING_UNKNOWN:
        raise ValueError("missing out of range")
    return b"".join((
        _GAP.pack(b"EG", GAP_VERSION, 0, epoch, after, upto,
                  MISSING_UNKNOWN if missing is None else missing),
        _short("node", node), _short("lane", lane), _short("reason", reason),
    ))


def _decode_gap(data: bytes) -> Gap:
    try:
        magic, version, _flags, epoch, after, upto, missing = _GAP.unpack_from(data, 0)
    except struct.error:
        raise FrameError(f"gap notice too short ({len(data)} bytes)") from None
    if version != GAP_VERSION:
        raise FrameError(f"unsupported gap notice version {version}")
    try:
        pos = _GAP.size
        fields = []
        for _ in range(3):
            n = data[pos]
            if pos + 1 + n > len(data):
                raise FrameError("gap notice truncated")
            fields.append(data[pos + 1 : pos + 1 + n].decode())
            pos += 1 + n
    except FrameError:
        raise
    except (IndexError, UnicodeDecodeError) as e:
        raise FrameError(f"corrupt gap notice: {e}") from None
    if pos != len(data):
        raise FrameError(f"{len(data) - pos} stray bytes after a gap notice")
    if not after < upto:
        raise FrameError(f"gap notice with after {after} >= upto {upto}")
    node, lane, reason = fields
    return Gap(node, epoch, lane, after, upto, None if missing == MISSING_UNKNOWN else missing, reason)


def decode_message(data: bytes) -> Frame | Gap:
    """Decode what arrives on ``ef/<node>/up/<lane>``: a frame or a gap notice."""
    if data[:2] == b"EG":
        return _decode_gap(data)
    return decode(data)
