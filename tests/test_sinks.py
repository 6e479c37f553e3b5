"""Sinks write each (node, epoch, seq) once, across restarts and crashes."""

import base64
import json

import orjson
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


def _reference_line(node, epoch, lane, seq, ts, topic, payload):
    try:
        body = {"payload": payload.decode()}
    except UnicodeDecodeError:
        body = {"payload": base64.b64encode(payload).decode(), "encoding": "base64"}
    return {"node": node, "epoch": epoch, "seq": seq, "lane": lane, "topic": topic, **body, "ts": rfc3339(ts)}


_groups = st.lists(st.tuples(
    st.sampled_from([("n1", 1, "telemetry"), ("n1", 1, "events"), ("n1", 2, "telemetry"), ("n2", 1, "events")]),
    st.lists(st.integers(0, 60), max_size=30),  # seqs in any order, repeats allowed
), max_size=8)


@settings(max_examples=150, deadline=None)
@given(st.lists(_groups, min_size=1, max_size=4), st.integers(0, 3))
def test_jsonl_write_records_writes_each_seq_once_in_order(tmp_path_factory, batches, reopen_after):
    """write_records (the fast path of a drain: seqs above all held, no lookup) writes what a
    set of (node, epoch, seq) says is new, in the given order, across batches and a reopen."""
    p = tmp_path_factory.mktemp("sink") / "out.jsonl"
    sink = JsonlSink(p)
    sink.open()
    held: set[tuple[str, int, int]] = set()
    want = []
    for i, batch in enumerate(batches):
        if i == reopen_after:
            sink.close()
            sink = JsonlSink(p)
            sink.open()
        groups, written, dups = [], 0, 0
        for (node, epoch, lane), seqs in batch:
            recs = [(s, 1795805035000 + s, f"dt/d{s % 3}/t", b'{"n":%d}' % s if s % 7 else b"\xff%d" % s)
                    for s in seqs]
            groups.append((node, epoch, lane, recs))
            for s, ts, topic, payload in recs:
                if (node, epoch, s) in held:
                    dups += 1
                    continue
                held.add((node, epoch, s))
                written += 1
                want.append(_reference_line(node, epoch, lane, s, ts, topic, payload))
        assert sink.write_records(groups) == (written, dups)
    sink.close()
    # byte for byte what the rows were before the fast path: the dicts through orjson
    assert p.read_bytes().splitlines() == [orjson.dumps(d) for d in want]


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
