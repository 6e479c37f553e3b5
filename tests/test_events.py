"""edge.events: the CloudEvents envelope of docs/events.md."""

import subprocess
import sys
import time

import orjson
import pytest

from edge.errors import EnvelopeError
from edge.events import decode, derived_id, encode, envelope, is_ulid, new_id, now_rfc3339, ulid_ms


def test_ids_are_ulids_strictly_increasing_and_carry_the_time():
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    assert all(is_ulid(i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert before <= ulid_ms(ids[0]) <= ulid_ms(ids[-1]) <= after


def test_derived_ids_are_stable_per_trigger_producer_and_index():
    t = new_id()
    a = derived_id(t, "rules", 0)
    assert a == derived_id(t, "rules", 0) == derived_id(t.lower(), "rules", 0)
    assert len({a, derived_id(t, "rules", 1), derived_id(t, "other", 0)}) == 3
    assert a[:10] == t[:10] and is_ulid(a)
    # no ULID trigger: a fresh id every time
    assert derived_id(None, "rules", 0) != derived_id(None, "rules", 0)
    assert derived_id("not-a-ulid", "rules", 0) != derived_id("not-a-ulid", "rules", 0)


def test_envelope_has_the_documented_attributes():
    env = envelope(
        source="/pi-01/devices/s7",
        type="io.edgeferry.telemetry.temperature",
        data={"value": 21.5},
        subject="s7",
    )
    assert env["specversion"] == "1.0" and is_ulid(env["id"])
    assert env["correlationid"] == env["id"]  # starts a chain
    assert env["datacontenttype"] == "application/json"
    assert env["time"].endswith("Z") and len(env["time"]) == 24
    ev = decode(encode(env))
    assert (ev.id, ev.source, ev.type, ev.subject, ev.data, ev.raw) == (
        env["id"],
        "/pi-01/devices/s7",
        "io.edgeferry.telemetry.temperature",
        "s7",
        {"value": 21.5},
        False,
    )
    assert abs(ev.timestamp - time.time()) < 5
    assert (
        decode(encode(envelope(source="s", type="t", correlationid="C", x1="y"))).correlationid
        == "C"
    )
    assert decode(encode(envelope(source="s", type="t", x1="y"))).extensions == {"x1": "y"}


@pytest.mark.parametrize("payload", [b"21.5", b'{"value": 3}', b"[1, 2]", b'"text"', b"null"])
def test_raw_json_is_the_data_of_an_implicit_event(payload):
    ev = decode(payload)
    assert ev.raw and ev.id is None and ev.data == orjson.loads(payload)


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"\xff\xfe", "not_utf8"),
        (b'{"v": "\xc3\x28"}', "not_utf8"),
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"specversion": "0.3", "id": "a", "source": "s", "type": "t"}', "bad_envelope"),
        (b'{"specversion": "1.0", "source": "s", "type": "t"}', "bad_envelope"),
        (b'{"specversion": "1.0", "id": "a", "source": 5, "type": "t"}', "bad_envelope"),
        (
            b'{"specversion": "1.0", "id": "a", "source": "s", "type": "t", "time": 5}',
            "bad_envelope",
        ),
    ],
)
def test_bad_payloads_name_their_reason(payload, reason):
    with pytest.raises(EnvelopeError) as e:
        decode(payload)
    assert e.value.reason == reason


def test_now_is_rfc3339_utc_millis():
    s = now_rfc3339()
    assert s[10] == "T" and s.endswith("Z") and s[19] == "."


def test_events_module_does_not_import_pydantic():
    code = (
        "import sys, edge, edge.events; assert 'pydantic' not in sys.modules, 'pydantic imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
