"""Sinks write each (node, epoch, seq) once, across restarts and crashes."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sinks import JsonlSink, SeqSet, SqliteSink, read_sink, rfc3339


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=400))
def test_seqset_behaves_like_a_set(values):
    s, ref = SeqSet(), set()
    for v in values:
        assert s.add(v) == (v not in ref)
        ref.add(v)
    assert len(s) == len(ref)
    assert all(v in s for v in ref)
    ranges = s.ranges
    assert all(a[1] + 1 < b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # disjoint


def rows(node, epoch, seqs, lane="telemetry"):
    return [(node, epoch, lane, s, 1795805035000 + s, "dt/d/t", b'{"n":%d}' % s) for s in seqs]


def test_jsonl_dedup_survives_reopen_and_a_torn_last_line(tmp_path):
    p = tmp_path / "out.jsonl"
    sink = JsonlSink(p)
    sink.open()
    assert sink.write(rows("n", 1, range(1, 6))) == (5, 0)
    assert sink.write(rows("n", 1, range(3, 9))) == (3, 3)
    sink.close()
    with open(p, "ab") as f:  # a crash in the middle of a line
        f.write(b'{"node":"n","epoch":1,"seq":9,"lane":"tel')
    sink = JsonlSink(p)
    sink.open()
    assert sink.write(rows("n", 1, range(1, 11))) == (2, 8)  # 9 and 10 are new
    assert sink.write(rows("n", 2, [1])) == (1, 0)  # another epoch is another sequence
    sink.close()
    lines = p.read_bytes().splitlines()
    assert all(json.loads(line) for line in lines)
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 11)) + [1]


def test_jsonl_row_format(tmp_path):
    p = tmp_path / "out.jsonl"
    sink = JsonlSink(p)
    sink.open()
    sink.write([("n", 7, "events", 1, 1795805035123, "evt/a/b", "héllo".encode()),
                ("n", 7, "events", 2, 1795805035123, "evt/a/b", b"\xff\xfe")])
    sink.close()
    a, b = (json.loads(line) for line in p.read_text().splitlines())
    assert a == {"node": "n", "epoch": 7, "seq": 1, "lane": "events", "topic": "evt/a/b",
                 "payload": "héllo", "ts": "2026-11-27T18:43:55.123Z"}
    assert b["encoding"] == "base64" and b["payload"] == "//4="


def test_sqlite_sink_unique_key(tmp_path):
    p = tmp_path / "out.db"
    sink = SqliteSink(p)
    sink.open()
    assert sink.write(rows("n", 1, range(1, 6))) == (5, 0)
    sink.close()
    sink = SqliteSink(p)
    sink.open()
    assert sink.write(rows("n", 1, range(4, 8))) == (2, 2)
    sink.close()
    got = read_sink(f"sqlite:{p}")
    assert [r["seq"] for r in got] == list(range(1, 8))


def test_rfc3339():
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1795805035007) == "2026-11-27T18:43:55.007Z"
