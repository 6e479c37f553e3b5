"""The PostgreSQL sink against the machine's PostgreSQL, each test in a database of its own."""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest

from tests.postgres import pg_url  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(60)

DAY_MS = 86_400_000
NOW_MS = int(dt.datetime.now(dt.UTC).timestamp() * 1000)  # a record's ts is the same on every resend


def recs(first: int, last: int, ts: int | None = None, topic: str = "dt/d/t") -> list[tuple[int, int, str, bytes]]:
    now = NOW_MS if ts is None else ts
    return [(s, now, topic, b'{"n":%d}' % s) for s in range(first, last + 1)]


def open_pg(url):
    from gateway.sinks import open_sink

    return open_sink(url)


def count(url: str, q: str = "SELECT count(*) FROM records") -> int:
    import psycopg

    with psycopg.connect(url) as db:
        return db.execute(q).fetchone()[0]


def test_frames_in_order_out_of_order_and_again(pg_url):  # noqa: F811
    sink = open_pg(pg_url)
    try:
        b = sink.write_frames([("n1", 7, "telemetry", 0, recs(1, 10))])
        assert (b.written, b.duplicates) == (10, 0)
        assert b.acks == {("n1", 7): {"telemetry": 10}}
        # a frame ahead of a hole is written at once, the high stays below the hole
        b = sink.write_frames([("n1", 7, "telemetry", 20, recs(21, 30))])
        assert (b.written, b.duplicates) == (10, 0)
        assert b.acks == {("n1", 7): {"telemetry": 10}}
        assert sink.waiting(0.0) == {("n1", 7, "telemetry"): 10}
        # the hole fills: the high jumps over what waited
        b = sink.write_frames([("n1", 7, "telemetry", 10, recs(11, 20))])
        assert b.acks == {("n1", 7): {"telemetry": 30}}
        assert sink.waiting(0.0) == {}
        # everything again, and a frame overlapping the high: duplicates, nothing written
        b = sink.write_frames([("n1", 7, "telemetry", 0, recs(1, 30)), ("n1", 7, "telemetry", 25, recs(26, 31))])
        assert (b.written, b.duplicates) == (1, 35)
        assert count(pg_url) == 31
        # the same seq resent ahead of the high (another worker wrote it): the key drops it
        b = sink.write_frames([("n1", 7, "telemetry", 40, recs(41, 45))])
        b = sink.write_frames([("n1", 7, "telemetry", 40, recs(41, 46))])
        assert (b.written, b.duplicates) == (1, 5)
    finally:
        sink.close()


def test_columns_json_and_binary_payloads_and_read_sink(pg_url):  # noqa: F811
    from gateway.sinks import read_sink

    sink = open_pg(pg_url)
    ts = 1_700_000_000_123
    try:
        sink.write_frames([("n1", 1, "events", 0, [
            (1, ts, "evt/a/b", b'{"x":[1,2]}'), (2, ts, "evt/a/b", b"\xff\x00raw"),
            (3, ts, "evt/a/b", b"plain text"), (4, ts, "evt/a/b", b'{"nul":"\\u0000"}'),
            (5, ts, "evt/a/b", b'{"broken":')])])
    finally:
        sink.close()
    import psycopg

    with psycopg.connect(pg_url) as db:
        got = db.execute("SELECT seq, payload, payload_json FROM records ORDER BY seq").fetchall()
    assert [(s, bytes(p), j) for s, p, j in got] == [
        (1, b'{"x":[1,2]}', {"x": [1, 2]}), (2, b"\xff\x00raw", None), (3, b"plain text", None),
        (4, b'{"nul":"\\u0000"}', None), (5, b'{"broken":', None)]
    rows = read_sink(pg_url)
    assert rows[0] == {"node": "n1", "epoch": 1, "seq": 1, "lane": "events", "topic": "evt/a/b",
                       "payload": '{"x":[1,2]}', "ts": "2023-11-14T22:13:20.123Z"}
    assert rows[1]["encoding"] == "base64"


def test_two_writers_on_one_lane_neither_both_win_nor_leave_a_hole(pg_url):  # noqa: F811
    """Two sinks (two workers) write interleaved and repeated frames of one lane from two
    threads: every record once, and the high ends at the last seq."""
    sinks = [open_pg(pg_url), open_pg(pg_url)]
    frames = [("n1", 1, "telemetry", s - 10, recs(s - 9, s)) for s in range(10, 2001, 10)]
    written = [0, 0]

    def work(i: int) -> None:
        mine = frames[i::2] + frames[(1 - i)::4]  # its own half, and some of the other's again
        for k in range(0, len(mine), 8):
            b = sinks[i].write_frames(mine[k:k + 8])
            written[i] += b.written

    try:
        ts = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        b = sinks[0].write_frames([("n1", 1, "telemetry", 2000, recs(2001, 2001))])
        print(f"[two writers] sent=2000 written={sum(written)} rows={count(pg_url)}")
        assert sum(written) == 2000 and count(pg_url) == 2001
        assert b.acks == {("n1", 1): {"telemetry": 2001}}
        assert sinks[0].waiting(0.0) == {}
    finally:
        for s in sinks:
            s.close()


def test_gap_notice_counts_as_held(pg_url):  # noqa: F811
    from gateway.sinks import read_gaps

    sink = open_pg(pg_url)
    try:
        sink.write_frames([("n1", 1, "telemetry", 0, recs(1, 5))])
        sink.write_frames([("n1", 1, "telemetry", 9, recs(10, 12))])
        assert sink.write_gap(("n1", 1, "telemetry", 5, 9, 4, "evicted")) is True
        assert sink.write_gap(("n1", 1, "telemetry", 5, 9, 4, "evicted")) is False
        b = sink.write_frames([("n1", 1, "telemetry", 12, recs(13, 13))])
        assert b.acks == {("n1", 1): {"telemetry": 13}}
    finally:
        sink.close()
    assert [(g["after"], g["upto"], g["missing"]) for g in read_gaps(pg_url)] == [(5, 9, 4)]


def test_a_gap_reported_again_is_counted_once(pg_url):  # noqa: F811
    """A notice counts from exactly what is held: one from below it (an answer to an
    earlier request, reaching further) or ahead of it is not recorded, so no record is
    counted twice; the hole it leaves is asked for again (waiting) and answered exactly."""
    from gateway.sinks import read_gaps

    sink = open_pg(pg_url)
    try:
        sink.write_frames([("n1", 1, "telemetry", 0, recs(1, 5))])
        assert sink.write_gap(("n1", 1, "telemetry", 5, 9, 4, "evicted")) is True
        assert sink.write_gap(("n1", 1, "telemetry", 5, 12, 7, "evicted")) is False  # 6-9 again
        assert sink.write_gap(("n1", 1, "telemetry", 14, 16, 2, "evicted")) is False  # ahead
        b = sink.write_frames([("n1", 1, "telemetry", 16, recs(17, 18))], [("n1", 1, "telemetry", 5, 9, 4, "evicted")])
        assert not b.new_gaps and b.acks == {("n1", 1): {"telemetry": 9}}
        assert sink.waiting(0.0) == {("n1", 1, "telemetry"): 9}
        b = sink.write_frames([], [("n1", 1, "telemetry", 9, 16, 5, "evicted")])  # the exact answer
        assert len(b.new_gaps) == 1 and b.acks == {("n1", 1): {"telemetry": 18}}
    finally:
        sink.close()
    assert [(g["after"], g["upto"], g["missing"]) for g in read_gaps(pg_url)] == [(5, 9, 4), (9, 16, 5)]


def test_partitions_ahead_default_moved_and_retention(pg_url):  # noqa: F811
    from gateway.pgsink import ensure_partitions, parse_keep, retention

    sink = open_pg(pg_url)
    today = dt.datetime.now(dt.UTC).date()
    old_day = today - dt.timedelta(days=200)
    old_ms = int(dt.datetime(old_day.year, old_day.month, old_day.day, 12, tzinfo=dt.UTC).timestamp() * 1000)
    try:
        names = [r[0] for r in sink.db.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'records'::regclass ORDER BY 1").fetchall()]
        assert f"records_{today:%Y%m%d}" in names and "records_default" in names
        assert f"records_{today + dt.timedelta(days=3):%Y%m%d}" in names
        # a backlog 200 days old lands in the default partition ...
        sink.write_frames([("n1", 1, "telemetry", 0, recs(1, 5, ts=old_ms)),
                           ("n1", 1, "telemetry", 5, recs(6, 8))])
        assert count(pg_url, "SELECT count(*) FROM records_default") == 5
        # ... and moves into its day's partition when that is created; the key still holds
        assert ensure_partitions(sink.db, [old_day]) == [f"records_{old_day:%Y%m%d}"]
        assert count(pg_url, "SELECT count(*) FROM records_default") == 0
        assert count(pg_url, f"SELECT count(*) FROM records_{old_day:%Y%m%d}") == 5
        sink.write_frames([("n2", 1, "telemetry", 0, recs(1, 1, ts=old_ms - 2 * DAY_MS))])
    finally:
        sink.close()
    assert retention(pg_url, parse_keep("90d"), dry_run=True) == ([f"records_{old_day:%Y%m%d}"], 1)
    dropped, deleted = retention(pg_url, parse_keep("90d"))
    assert dropped == [f"records_{old_day:%Y%m%d}"] and deleted == 1
    assert count(pg_url) == 3
    with pytest.raises(ValueError, match="90d"):
        parse_keep("ninety days")


def test_migrations_applied_once_and_indexes(pg_url):  # noqa: F811
    sink = open_pg(pg_url)
    sink.close()
    sink = open_pg(pg_url)  # a second start (or worker) applies nothing again
    sink.close()
    assert count(pg_url, "SELECT count(*) FROM ef_migrations") == 1
    import psycopg

    with psycopg.connect(pg_url) as db:
        idx = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'records'")}
    assert {"records_node_ts", "records_topic_ts"} <= idx


def test_bad_url_is_one_clear_error():
    from gateway.errors import SinkError
    from gateway.sinks import open_sink

    with pytest.raises(SinkError, match=r"cannot open sink postgresql://u:\*\*\*@127.0.0.1:1/x"):
        open_sink("postgresql://u:secret@127.0.0.1:1/x")


def test_ingest_kill9_under_load_postgresql(tmp_path, broker_factory, proc_factory, chaos, pg_url):  # noqa: F811
    from tests.harness import wait_until
    from tests.pipeline import Pipeline

    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos, sink=pg_url,
                    ingest_args=("--downlink", "false"))
    pipe.start()
    rate = 2000
    load = pipe.load(rate * 6, rate, "pk")

    def stored(n: int):  # noqa: ANN202
        return lambda: pipe.status()["counters"]["stored"] >= n

    wait_until(stored(rate * 2), 20, "load flowing")
    pipe.ingest.kill9()
    wait_until(stored(rate * 3), 20, "load flowing while ingest is down")
    pipe.start_ingest()
    sent = pipe.wait_sent(load, 60)
    pipe.wait_delivered(sent, 60)
    r = pipe.tally("pk", sent, label="ingest kill -9 (postgresql sink)")
    assert (r["lost"], r["duplicated"], r["unexpected"], r["out_of_order"]) == (0, 0, 0, 0), r
    # the fleet view from the database: the node's lanes, written up to what was received
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "edgeferry", "ingest", "status", "--sink", pg_url, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lanes = json.loads(out.stdout)
    assert lanes and {ln["node"] for ln in lanes} == {"pi-1"}
    assert all(ln["lag"] == 0 and ln["waiting"] == 0 for ln in lanes), lanes
    assert sum(ln["high"] for ln in lanes) >= sent


def test_cloudstate_rules_in_postgresql(pg_url, tmp_path, monkeypatch):  # noqa: F811
    """The command and shadow rules (tests/test_downlink_units.py) on the PostgreSQL store."""
    import tests.test_downlink_units as units
    from gateway.cloudstate import CloudState
    from gateway.pgstate import PgConn

    monkeypatch.setattr(units, "CloudState", lambda _path: CloudState.for_sink(pg_url))
    units.test_cloudstate_rules(tmp_path)
    st = CloudState.for_sink(pg_url)
    assert isinstance(st._db, PgConn)
    assert st.shadow("n1", "d")["desired_version"] == 2  # type: ignore[index]
    st.close()


def test_command_round_trip_with_the_postgresql_sink(tmp_path, broker_factory, proc_factory, chaos, pg_url):  # noqa: F811
    """A command sent from the CLI to a site and its status back, the state kept in the
    PostgreSQL sink's database (tests/test_downlink.py's round trip)."""
    import tests.test_downlink as down
    from tests.pipeline import Pipeline

    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos, node="site-1",
                    gateway_args=("--redeliver", "1s"), sink=pg_url)
    down.test_command_online_round_trip(pipe, proc_factory)


def test_the_gateway_and_file_sinks_never_import_the_driver():
    import subprocess
    import sys

    code = ("import sys, gateway.main, gateway.gateway, gateway.ingest, gateway.sinks, gateway.cloudstate\n"
            "from gateway.sinks import open_sink\n"
            "open_sink('jsonl:' + sys.argv[1]).close()\n"
            "assert 'psycopg' not in sys.modules, 'psycopg imported'\n")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", code, f"{d}/x.jsonl"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_retention_command(pg_url):  # noqa: F811
    import subprocess
    import sys

    sink = open_pg(pg_url)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=100)
    sink.write_frames([("n1", 1, "telemetry", 0, recs(1, 3, ts=int(old.timestamp() * 1000))),
                       ("n1", 1, "telemetry", 3, recs(4, 5))])
    sink.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgeferry", "ingest", "retention", *args],
                              capture_output=True, text=True, timeout=30)

    r = cli("--sink", pg_url, "--keep", "90d", "--dry-run")
    assert r.returncode == 0 and "would drop 0 partitions; 3 rows of the default partition to delete" in r.stdout, r
    assert count(pg_url) == 5
    r = cli("--sink", pg_url, "--keep", "90d")
    assert r.returncode == 0 and "3 rows of the default partition deleted" in r.stdout, r
    assert count(pg_url) == 2
    r = cli("--sink", "jsonl:/tmp/x.jsonl", "--keep", "90d")
    assert r.returncode == 2 and "postgresql" in r.stderr
    r = cli("--sink", pg_url, "--keep", "soon")
    assert r.returncode == 2 and "90d" in r.stderr
