"""Cloud profiles: the limits of known cloud brokers (docs/clouds.md gives each figure's
public source), and the token bucket that keeps a connection under its publish rate.

A profile sets defaults that each ``--cloud-*`` setting overrides: the largest message
the broker takes (frames are cut to fit, the frame header and the PUBLISH packet's own
bytes counted), publishes per second on one connection, QoS 1 messages in flight, the
keepalive range (a keepalive outside it is moved into it, with a warning), topic levels
and length and client id length (checked at start: a topic or client id the broker
would refuse is a settings error, not a reconnect loop). No profile allows QoS 2; the
gateway never uses it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from edge.errors import ConfigError

__all__ = ["PROFILES", "CloudLimits", "CloudProfile", "TokenBucket", "profile"]

log = logging.getLogger("edgeferry.gateway")


@dataclass(frozen=True)
class CloudProfile:
    """0 means "no limit known" for each number."""

    name: str
    max_message_bytes: int = 0
    publishes_per_s: float = 0.0
    max_inflight: int = 0
    keepalive_min: float = 0.0
    keepalive_max: float = 0.0
    max_topic_levels: int = 0
    max_topic_bytes: int = 0
    max_client_id_bytes: int = 0
    shared_subscriptions: bool = True
    topic_forbidden: str = ""  # characters the broker refuses in a topic
    note: str = ""

    def message_budget(self, topic: str) -> int:
        """Bytes left for a payload on ``topic`` under max_message_bytes (0: no limit).
        The whole PUBLISH is counted: fixed header (5 at most), topic (2 + length) and
        packet id (2), which is at least as strict as a broker counting the payload."""
        if not self.max_message_bytes:
            return 0
        return self.max_message_bytes - (5 + 2 + len(topic.encode()) + 2)

    def check_topic(self, topic: str, what: str) -> None:
        bad = sorted({c for c in topic if c in self.topic_forbidden})
        if bad:
            raise ConfigError(f"cloud profile {self.name}: {what} {topic!r} has {' and '.join(map(repr, bad))}, "
                              f"which the broker refuses in a topic (it closes the connection): "
                              f"choose a node id and lane names without")
        levels = topic.count("/") + 1
        if self.max_topic_levels and levels > self.max_topic_levels:
            raise ConfigError(f"cloud profile {self.name}: {what} {topic!r} has {levels} topic "
                              f"levels; the broker takes at most {self.max_topic_levels}")
        if self.max_topic_bytes and len(topic.encode()) > self.max_topic_bytes:
            raise ConfigError(f"cloud profile {self.name}: {what} {topic!r} is longer than "
                              f"{self.max_topic_bytes} bytes")

    def check_client_id(self, client_id: str) -> None:
        if self.max_client_id_bytes and len(client_id.encode()) > self.max_client_id_bytes:
            raise ConfigError(f"cloud profile {self.name}: client id {client_id!r} is longer than "
                              f"{self.max_client_id_bytes} bytes (set --client-id)")

    def keepalive(self, seconds: float) -> float:
        """The keepalive moved into the broker's range."""
        if self.keepalive_min and seconds < self.keepalive_min:
            return self.keepalive_min
        if self.keepalive_max and seconds > self.keepalive_max:
            return self.keepalive_max
        return seconds


KB = 1000
PROFILES: dict[str, CloudProfile] = {p.name: p for p in (
    CloudProfile("generic"),
    # AWS IoT Core quotas (message broker): 128 KB payload, 100 publishes/s per connection,
    # 100 unacknowledged QoS 1 each way, keepalive 30-1200 s, 7 slashes, 256 B topics,
    # 128 B client ids, no QoS 2, no shared subscriptions with MQTT 3.1.1
    CloudProfile("aws-iot", 128 * KB, 100, 100, 30, 1200, 8, 256, 128, shared_subscriptions=False,
                 note="port 8883, or 443 with --alpn x-amzn-mqtt-ca; X.509 client certificate"),
    # Azure Event Grid MQTT broker: 1,000 publishes/s and 1 MB/s per session, 1,000
    # in flight; keepalive at most 1,160 s; QoS 2 refused
    CloudProfile("azure-eventgrid", 512 * 1024, 1000, 1000, 0, 1160, 0, 0, 0,
                 note="port 8883, TLS 1.2+; user name = client authentication name"),
    # HiveMQ Cloud: MQTT compliant; billing counts messages in 5 KB units
    CloudProfile("hivemq-cloud", note="port 8883, TLS; user name and password"),
    # EMQX Serverless: 1 MB messages, 10 publishes/s per client, 1,000 queued, client ids
    # at most 1,024 bytes, topics at most 10 levels in subscriptions
    CloudProfile("emqx-serverless", 1000 * KB, 10, 0, 0, 0, 10, 0, 1024,
                 note="port 8883, TLS 1.2/1.3; user name and password"),
    # EMQX (own deployment): 1 MB messages by default (mqtt.max_packet_size)
    CloudProfile("emqx", 1024 * 1024, note="limits are the deployment's own"),
    # NATS server's MQTT listener: MQTT 3.1.1 only, needs JetStream, max_payload 1 MB;
    # a publish to a topic with '.' or ' ' closes the connection (measured, 2.9.10); a
    # $share/G/... filter is taken as a topic of its own: nothing arrives (measured, 2.9.10)
    CloudProfile("nats", 1024 * 1024, topic_forbidden=". ", shared_subscriptions=False,
                 note="MQTT 3.1.1 only; JetStream on; no retained messages across a JetStream loss; "
                 "no shared subscriptions"),
    # RabbitMQ MQTT plugin (3.10 here): QoS 0 and 1 only, no shared subscriptions,
    # retained messages in a node-local store; message size: the broker's setting
    CloudProfile("rabbitmq", shared_subscriptions=False,
                 note="QoS 2 downgraded to 1; no shared subscriptions"),
)}


def profile(name: str, **overrides: float | int | None) -> CloudProfile:
    """A profile by name with overrides (None: keep the profile's value)."""
    try:
        base = PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown cloud profile {name!r} (one of {', '.join(PROFILES)})") from None
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **changes) if changes else base  # type: ignore[arg-type]


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, ``burst`` at once. ``rate``
    0: no limit. Time is the monotonic clock."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        # a tenth of a second's worth at once: no second ever sees much more than ``rate``
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._tokens = self.burst
        self._t = time.monotonic()
        self.waited = 0.0  # seconds spent waiting for tokens (shown in status)

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now

    async def take(self) -> None:
        if not self.rate:
            return
        self._refill()
        while self._tokens < 1:
            wait = (1 - self._tokens) / self.rate
            self.waited += wait
            import asyncio  # here: reading settings does not import asyncio (edge/_nossl.py)

            await asyncio.sleep(wait)  # pacing the link, the limit's own time
            self._refill()
        self._tokens -= 1


FRAME_OVERHEAD = 32 + 2 + 2 + 2 + 18 + 64
"""A frame's bytes besides its node, lane, topic and payload for one record: header,
lengths, a one-topic table, the record header, and room for zstd's own framing."""

MIN_FRAME_CAP = 1024

RETRY_AFTER_FRAMES = 500
"""Frames confirmed in cautious mode before larger frames are tried again."""

PROBE_WAIT = 3.0
"""Seconds a probe frame (cautious mode) may take to be confirmed by ingest."""

UNCONFIRMED_WARN = 60.0
"""Seconds frames may stay acknowledged by the broker but unconfirmed by ingest before
the gateway says so."""


class CloudLimits:
    """What the uplink asks before and after each frame on one cloud link:

    * :meth:`fit` cuts a frame's records until the encoded frame fits the message limit
      (the profile's, and ``frame_max_bytes``, and a lower one learnt from the broker);
    * :meth:`take` waits for the publish rate's token bucket;
    * :meth:`record_fits` says whether a message can ever travel (else it is rejected
      at intake, counted, rather than stalling its lane);
    * the connection events (:meth:`connected`, :meth:`frame_sent`, :meth:`frame_acked`,
      :meth:`lost`) notice a broker that answers a frame by closing the connection: twice
      in a row with nothing acknowledged, and the frame that went first is taken as too
      large; frames are then cut to half of it (growing back after 50 acknowledged frames,
      never to the size refused). The log and status say so.
    """

    def __init__(self, profile: CloudProfile, frame_max_bytes: int, topic_for: Callable[[str], str],
                 node: str) -> None:
        self.profile = profile
        self.frame_max_bytes = frame_max_bytes
        self._topic_for = topic_for
        self._node = node
        self.bucket = TokenBucket(profile.publishes_per_s)
        self.learnt_cap: int | None = None  # from the broker's behaviour
        self.refused_size: int | None = None
        self.suspected: str | None = None
        self._strikes = 0
        self._first_sent: int | None = None
        self._acks = 0
        self._ok_since_cut = 0
        self._sent: deque[tuple[str, int, int, int]] = deque(maxlen=4096)  # lane, first, hi, size
        self.good_size = 0  # the largest frame ingest confirmed
        self.dropped_size: int | None = None  # the smallest frame acknowledged and lost
        self.cautious = False
        self._probe: tuple[str, int, int, int] | None = None
        self._probe_at = 0.0
        self.probe_done = False
        self._cautious_ok = 0
        self._confirmed_seen: tuple[tuple[str, int], ...] = ()
        self._unconfirmed_since: float | None = None
        self._warned_at: float | None = None
        self.unconfirmed: str | None = None

    def _normal_cap(self, lane: str) -> int:
        cap = self.frame_max_bytes
        budget = self.profile.message_budget(self._topic_for(lane))
        if budget:
            cap = min(cap, budget)
        if self.learnt_cap is not None:
            cap = min(cap, self.learnt_cap)
        return max(cap, MIN_FRAME_CAP)

    def cap(self, lane: str) -> int:
        """Largest frame for a lane now. In cautious mode (frames were acknowledged by the
        broker and lost): the largest size ingest confirmed, and one probe frame at a time
        halfway to the smallest size lost, so the limit is found by bisection."""
        cap = self._normal_cap(lane)
        if not self.cautious:
            return cap
        good = max(self.good_size, MIN_FRAME_CAP)
        if self._probe is not None or self.dropped_size is None:
            return min(cap, good)
        if self.dropped_size - good <= max(MIN_FRAME_CAP, self.dropped_size // 20):
            return min(cap, good)  # close enough: no more probes
        return min(cap, (good + self.dropped_size) // 2)

    def record_fits(self, lane: str, topic: str, payload: bytes) -> bool:
        most = self.max_payload(lane, topic)
        return most is None or len(payload) <= most

    def max_payload(self, lane: str, topic: str) -> int | None:
        """The largest payload on ``topic`` that a frame of ``lane`` can carry (None: no
        limit); the same for every message on that topic (the intake caches it)."""
        budget = self.profile.message_budget(self._topic_for(lane))
        if not budget:
            return None
        return budget - (FRAME_OVERHEAD + len(self._node) + len(lane) + len(topic.encode()))

    def fit(self, lane: str, rows: list[Any], encode: Callable[[list[Any]], bytes],
            ) -> tuple[bytes, list[Any]]:
        """Encode ``rows``, dropping rows from the end until the frame fits (one row always
        goes: record_fits kept larger ones out)."""
        cap = self.cap(lane)
        frame = encode(rows)
        while len(frame) > cap and len(rows) > 1:
            keep = max(1, min(len(rows) - 1, len(rows) * cap // len(frame) - 1))
            rows = rows[:keep]
            frame = encode(rows)
        return frame, rows

    async def take(self) -> None:
        await self.bucket.take()

    def connected(self) -> None:
        self._first_sent = None
        self._acks = 0

    def frame_sent(self, size: int, lane: str = "", first: int = 0, hi: int = 0) -> None:
        if self._first_sent is None:
            self._first_sent = size
        self._sent.append((lane, first, hi, size))
        if self.cautious and self._probe is None and size > max(self.good_size, MIN_FRAME_CAP):
            self._probe = (lane, first, hi, size)
            self._probe_at = time.monotonic()

    def probe_wait(self, lane: str) -> tuple[float, int | None]:
        """Before sending on ``lane``: a probe frame goes alone. ``(seconds, None)``: wait
        for its confirmation; ``(0, after)``: it was not confirmed within PROBE_WAIT,
        taken as lost: resend the lane after ``after``; ``(0, None)``: go on."""
        p = self._probe
        if p is None or p[0] != lane:
            return 0.0, None
        left = self._probe_at + PROBE_WAIT - time.monotonic()
        if left > 0:
            return left, None
        self._probe = None
        self._forget(lane, p[1] - 1)
        self.dropped_size = p[3] if self.dropped_size is None else min(self.dropped_size, p[3])
        log.info("lane %s: a probe frame of %d bytes did not reach ingest within %g s: "
                 "frames stay at %d bytes", lane, p[3], PROBE_WAIT, max(self.good_size, MIN_FRAME_CAP))
        return 0.0, p[1] - 1

    def _forget(self, lane: str, after: int) -> None:
        """The lane is resent after ``after``: the frames sent after it count for nothing
        (a later confirmation covers their records, carried by the resent frames)."""
        self._sent = deque((f for f in self._sent if f[0] != lane or f[1] <= after),
                           maxlen=self._sent.maxlen)

    def confirmed(self, lane: str, upto: int) -> None:
        """Ingest has everything of ``lane`` up to ``upto``: the frames that carried it
        got through, whatever their size."""
        keep: deque[tuple[str, int, int, int]] = deque(maxlen=self._sent.maxlen)
        for f in self._sent:
            if f[0] == lane and f[2] <= upto:
                self.good_size = max(self.good_size, f[3])
                if self.cautious:
                    self._cautious_ok += 1
            else:
                keep.append(f)
        if self.cautious and self._cautious_ok >= RETRY_AFTER_FRAMES and self.dropped_size is not None:
            # the loss may have had another cause: try larger frames again, one probe at a time
            self._cautious_ok = 0
            self.dropped_size = None
        self._sent = keep
        p = self._probe
        if p is not None and p[0] == lane and p[2] <= upto:
            self._probe = None
            self.probe_done = True  # the uplink may send the next frame at once
        if self.cautious and self.good_size >= self._normal_cap(lane):
            self.cautious = False
            log.info("cloud link: frames of %d bytes reach ingest: full-size frames again",
                     self.good_size)

    def nacked(self, lane: str, after: int) -> bool:
        """Ingest asks for ``lane`` again after ``after``: the frame that followed it was
        acknowledged by the broker and never arrived. If that frame was larger than any
        ingest confirmed, suspect a size limit the broker enforces by dropping (Mosquitto's
        message_size_limit does): go cautious. True when it did."""
        lost = [f[3] for f in self._sent if f[0] == lane and f[1] == after + 1]
        self._forget(lane, after)
        if not lost or lost[-1] <= max(self.good_size, MIN_FRAME_CAP):
            return False
        size = lost[-1]
        self.dropped_size = size if self.dropped_size is None else min(self.dropped_size, size)
        self.cautious = True
        self._cautious_ok = 0
        p = self._probe
        if p is not None and p[0] == lane and p[1] > after:
            self._probe = None  # the probe was lost: it bounds the search from above
        good = max(self.good_size, MIN_FRAME_CAP)
        self.suspected = (f"message size: a frame of {size} bytes was acknowledged by the broker "
                          f"and never reached ingest; frames of {good} bytes get through")
        log.warning("lane %s: the frame of %d bytes after seq %d was acknowledged by the cloud "
                    "broker but never reached ingest: suspecting the broker drops messages over a "
                    "size limit; resending in frames of at most %d bytes, growing as ingest "
                    "confirms them (set --cloud-max-message-bytes)", lane, size, after, good)
        return True

    def frame_acked(self) -> None:
        self._acks += 1
        self._strikes = 0
        if self.learnt_cap is not None:
            self._ok_since_cut += 1
            if self._ok_since_cut >= 50:
                self._ok_since_cut = 0
                grown = self.learnt_cap * 2
                if self.refused_size is not None:
                    grown = min(grown, self.refused_size - 1)
                if grown > self.learnt_cap:
                    self.learnt_cap = grown
                    log.info("cloud link: frames of up to %d bytes again", grown)

    def lost(self) -> None:
        """The connection ended: was it the broker refusing our first frame again?"""
        size = self._first_sent
        if size is None or self._acks:
            self._strikes = 0
            return
        self._strikes += 1
        if self._strikes < 2:
            return
        self._strikes = 0
        self.refused_size = size if self.refused_size is None else min(self.refused_size, size)
        self.learnt_cap = max(MIN_FRAME_CAP, size // 2)
        self._ok_since_cut = 0
        self.suspected = (f"message size: the broker closed the connection twice after a frame of "
                          f"{size} bytes, acknowledging nothing; frames now at most "
                          f"{self.learnt_cap} bytes")
        log.warning("cloud broker closed the connection twice after a frame of %d bytes without "
                    "acknowledging it: suspecting a message size limit below that; sending frames "
                    "of at most %d bytes (set --cloud-max-message-bytes or --cloud-profile)",
                    size, self.learnt_cap)

    def watch_confirmations(self, acked: dict[str, int], ingested: dict[str, int]) -> set[str]:
        """Called every second: warn (once per stall, then every 5 minutes) when the cloud
        broker acknowledged frames that ingest has not confirmed for UNCONFIRMED_WARN s.
        Ingest may be down; or the broker drops what it acknowledged, as Mosquitto's
        message_size_limit does with messages over it (docs/clouds.md). Returns the lanes
        to resend: those whose first unconfirmed frame was larger than any ingest ever
        confirmed (see :meth:`nacked`); none when only ingest is away."""
        now = time.monotonic()
        behind = {lane for lane in acked if acked[lane] > ingested.get(lane, 0)}
        progress = tuple(sorted(ingested.items()))
        if not behind or progress != self._confirmed_seen:
            self._confirmed_seen = progress
            self._unconfirmed_since = now if behind else None
            self._warned_at = None
            return set()
        if self._unconfirmed_since is None:
            self._unconfirmed_since = now
        waited = now - self._unconfirmed_since
        if waited >= UNCONFIRMED_WARN and (self._warned_at is None or now - self._warned_at >= 300):
            self._warned_at = now
            self.unconfirmed = (f"lanes {', '.join(sorted(behind))}: acknowledged by the cloud broker, "
                                f"not confirmed by ingest for {waited:.0f} s")
            log.warning("cloud link: %s; is ingest running? (a broker that drops messages over its "
                        "size limit after acknowledging them looks the same: set "
                        "--cloud-max-message-bytes)", self.unconfirmed)
            return {lane for lane in behind if self.nacked(lane, ingested.get(lane, 0))}
        return set()

    def status(self) -> dict[str, object]:
        return {"profile": self.profile.name, "max_message_bytes": self.profile.max_message_bytes,
                "publishes_per_s": self.profile.publishes_per_s,
                "frame_cap": self.learnt_cap, "suspected_limit": self.suspected,
                "cautious": self.cautious, "confirmed_frame_bytes": self.good_size,
                "unconfirmed": self.unconfirmed if self._warned_at is not None else None,
                "publish_wait_s": round(self.bucket.waited, 3)}
