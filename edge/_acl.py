"""Which topics a service reads and writes: one answer for the broker's ACL and the SDK.

``edgeferry provision`` writes the local broker's ACL from :func:`read_filters` and
:func:`write_filters`. Mosquitto refuses a PUBLISH outside the ACL without telling an
MQTT 3.1.1 client: it acknowledges it and drops it (docs/deploy.md). So a service
checks its own publishes against the same list before sending (``strict_topics``, on
by default when the broker needs a user name) and raises :class:`TopicNotAllowed`
instead of losing the message silently.
"""

from __future__ import annotations

import functools
from typing import Any

from edge._routing import compile_pattern, match_specs
from edge.errors import TopicNotAllowed

__all__ = ["allowed_publishes", "check_publish", "read_filters", "write_filters"]


def read_filters(svc: Any) -> list[str]:
    """The filters the service subscribes to (its handlers, commands, desired state)."""
    return list(dict.fromkeys(r.filter for r in svc.routes))


def write_filters(svc: Any) -> list[str]:
    """The topics the service may publish, as filters: what its handlers and
    ``svc.publishes()`` declare, ``state/NAME`` (online/offline, its last will),
    ``state/NAME/heartbeat``, ``dlq/NAME``; with commands ``evt/cmd/NAME`` (statuses and
    replies); for each thing whose desired state it follows ``shadow/THING/reported``."""
    patterns = [p for r in svc.routes for p, _ in r.publishes]
    patterns += [p for p, _, _ in svc.publishes_declared]
    patterns += [f"state/{svc.name}", f"state/{svc.name}/heartbeat", f"dlq/{svc.name}"]
    commands = getattr(svc, "_commands", None)
    if commands is not None and commands.commands:
        patterns.append(f"evt/cmd/{svc.name}")
    for thing in sorted(getattr(commands, "_shadow_routed", ())):
        patterns.append(f"shadow/{thing}/reported")
    return list(dict.fromkeys(compile_pattern(p)[0] for p in patterns))


def allowed_publishes(svc: Any) -> list[str] | None:
    """The filters ``svc`` checks its publishes against, or None for no check.
    ``svc.strict_topics`` None (the default) means: check when the broker needs a user
    name, as a broker with an ACL does."""
    strict = getattr(svc, "strict_topics", None)
    if strict is None:
        from edge.mqtt import BrokerURL, parse_url

        broker = svc.broker
        url = parse_url(broker) if isinstance(broker, str) else broker
        strict = isinstance(url, BrokerURL) and url.username is not None
    return write_filters(svc) if strict else None


def check_publish(svc: Any, topic: str, allowed: list[str]) -> None:
    """Raise :class:`TopicNotAllowed` unless ``topic`` matches one of ``allowed``."""
    for flt in allowed:
        if match_specs(_specs(flt), topic) is not None:
            return
    raise TopicNotAllowed(
        f"service {svc.name}: publishing to {topic!r} is not allowed: it is not among the topics the "
        f"service declares ({', '.join(allowed)}), and the broker's ACL would drop it without telling us; "
        f"declare it with svc.publishes({topic!r}) or @svc.on(..., publishes=[...]) and provision again"
    )


@functools.lru_cache(maxsize=1024)
def _specs(flt: str) -> list[tuple[str, str | None]]:
    return compile_pattern(flt)[1]
