"""The cloud topic scheme (docs/topics.md) and the lane router (filters matched by
:mod:`edge.topics`)."""

from __future__ import annotations

from edge.topics import compile_filters

__all__ = ["LaneRouter", "uplink_topic", "ack_topic", "nack_topic", "INGEST_HELLO",
           "SYNC_HELLO", "down_topic", "cmd_topic", "desired_topic"]

INGEST_HELLO = "ef/_ingest/hello"
"""Ingest announces here, after subscribing, whether its session was resumed."""

SYNC_HELLO = "ef/_sync/hello"
"""Ingest's downlink sync announces here when it (re)connects: gateways send their hello."""


class LaneRouter:
    """Picks the lane of a topic: the first lane with a matching filter, else the default.
    Results are cached (the cache is dropped when it grows past ``cache_size``)."""

    def __init__(self, lanes: list[tuple[str, tuple[str, ...]]], default: str, cache_size: int = 4096):
        self._lanes = [(name, compile_filters(filters)) for name, filters in lanes]
        self._default = default
        self._cache: dict[str, str] = {}
        self._cache_size = cache_size

    def __call__(self, topic: str) -> str:
        lane = self._cache.get(topic)
        if lane is None:
            lane = self._default
            for name, match in self._lanes:
                if match(topic):
                    lane = name
                    break
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[topic] = lane
        return lane


def uplink_topic(node: str, lane: str) -> str:
    """Cloud topic of a node's frames for one lane."""
    return f"ef/{node}/up/{lane}"


def ack_topic(node: str) -> str:
    """Cloud topic where ingest reports (retained) what it wrote for a node."""
    return f"ef/{node}/ack"


def nack_topic(node: str) -> str:
    """Cloud topic where ingest asks a node to resend a lane."""
    return f"ef/{node}/nack"


def down_topic(node: str, what: str) -> str:
    """Downlink control topics of a node: ``hello``, ``state``, ``synced``."""
    return f"ef/{node}/down/{what}"


def cmd_topic(node: str, cid: str) -> str:
    """Cloud topic of one command for a node."""
    return f"ef/{node}/cmd/{cid}"


def desired_topic(node: str, thing: str) -> str:
    """Cloud topic of a thing's full desired document."""
    return f"ef/{node}/shadow/{thing}/desired"
