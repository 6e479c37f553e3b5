"""edge.topics: the one MQTT filter matcher (the in-memory broker and the gateway's lane
router both use it)."""

import pytest

from edge.topics import compile_filters, matches
from gateway.topics import LaneRouter

CASES = [
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("a/+", "a", False),
    ("a/+", "a/", True),  # an empty level is a level
    ("+/+", "/x", True),
    ("a/#", "a", True),  # '#' also matches the parent level
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("#", "a/b", True),
    ("#", "$SYS/x", False),  # wildcards first do not match $ topics
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/x", "$SYS/x", True),
    ("a/b/c", "a/b", False),
    ("dt/+/temperature", "dt/s1/temperature", True),
    ("dt/+/temperature", "dt/s1/humidity", False),
]


@pytest.mark.parametrize("flt,topic,want", CASES)
def test_matches(flt: str, topic: str, want: bool) -> None:
    assert matches(flt, topic) is want
    assert compile_filters([flt])(topic) is want
    assert compile_filters(["zz/none", flt])(topic) is want


def test_lane_router_first_matching_lane_else_default() -> None:
    route = LaneRouter([("events", ("evt/#", "state/+")), ("telemetry", ("dt/#",))], "other")
    assert route("evt/alert/x") == "events"
    assert route("state/gw") == "events"
    assert route("state/gw/heartbeat") == "other"
    assert route("dt/a/b") == "telemetry"
    assert route("$SYS/broker") == "other"
    assert route("dt/a/b") == "telemetry"  # from the cache
