"""MQTT topic filters: the one matcher of edgeferry (the in-memory broker, the gateway's
lane router and tests use it).

``+`` matches one whole level, a final ``#`` the rest (also nothing: ``a/#`` matches
``a``). A filter starting with ``+`` or ``#`` does not match a topic starting with ``$``
(``$SYS/...``), as MQTT 3.1.1 section 4.7.2 says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["compile_filters", "matches"]


def matches(flt: str, topic: str) -> bool:
    """True when ``topic`` matches the MQTT filter ``flt``."""
    if flt == topic:
        return True
    f = flt.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def compile_filters(filters: Iterable[str]) -> Callable[[str], bool]:
    """One predicate: does a topic match any of ``filters``? Exact filters (no wildcard)
    are one set lookup; the others are matched level by level."""
    exact = set()
    wild = []
    for f in filters:
        if "+" in f or "#" in f:
            wild.append(f)
        else:
            exact.add(f)
    if not wild:
        return exact.__contains__

    def any_match(topic: str) -> bool:
        return topic in exact or any(matches(f, topic) for f in wild)

    return any_match
