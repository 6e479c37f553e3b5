"""Service SDK pieces without a broker: topic patterns, handler signatures, the dedup
table, settings, loading MODULE:ATTR."""

import os
import subprocess
import sys
import time

import pytest
from pydantic import BaseModel

from edge import Event, HandlerSignatureError, Service, ServiceError
from edge._dedup import COMPACT_FACTOR, MAGIC, DedupTable, _record
from edge._launch import load_target
from edge._routing import compile_pattern, make_route, match_specs
from edge._runner import OPTIONS, apply_settings
from edge.config import load_settings
from edge.errors import ConfigError
from edge.topics import matches


class M(BaseModel):
    x: int


@pytest.mark.parametrize(
    "pattern,flt,topic,params",
    [
        ("dt/{device}/temperature", "dt/+/temperature", "dt/s1/temperature", {"device": "s1"}),
        ("dt/{device}/temperature", "dt/+/temperature", "dt/s1/humidity", None),
        ("dt/{device}/temperature", "dt/+/temperature", "dt//temperature", None),
        ("dt/{device}/temperature", "dt/+/temperature", "dt/s1/temperature/x", None),
        ("dt/{device}/{stream}", "dt/+/+", "dt/a/b", {"device": "a", "stream": "b"}),
        ("cmd/{target}/#", "cmd/+/#", "cmd/x/a/b", {"target": "x"}),
        ("cmd/{target}/#", "cmd/+/#", "cmd/x", {"target": "x"}),
        ("a/+/c", "a/+/c", "a/b/c", {}),
    ],
)
def test_patterns(pattern, flt, topic, params):
    f, specs = compile_pattern(pattern)
    assert f == flt
    assert match_specs(specs, topic) == params
    if params is not None:
        assert matches(flt, topic)


@pytest.mark.parametrize("pattern", ["", "a/#/b", "a/{x}{y}", "a/{x}/{x}", "a/b+", "dt/{1x}"])
def test_bad_patterns(pattern):
    with pytest.raises(HandlerSignatureError):
        compile_pattern(pattern)


def test_signatures():
    async def ok(device: str, m: M, event: Event, topic: str) -> None: ...

    r = make_route("dt/{device}/x", ok)
    assert (r.payload_param, r.event_param, r.topic_param, r.payload_type) == (
        "m",
        "event",
        "topic",
        M,
    )
    assert r.key("dt/a/x", {"device": "a"}) == "a"
    assert (
        make_route("a/{site}/{device}", lambda_async(), key="site").key(
            "t", {"site": "s", "device": "d"}
        )
        == "s"
    )

    async def missing(m: M) -> None: ...

    async def two_payloads(device: str, a: M, b: M) -> None: ...

    def not_async(device: str) -> None: ...

    async def bad_placeholder_type(device: list, m: M) -> None: ...

    for fn in (missing, two_payloads, not_async, bad_placeholder_type):
        with pytest.raises(HandlerSignatureError):
            make_route("dt/{device}/x", fn)
    with pytest.raises(HandlerSignatureError):
        make_route("dt/{device}/x", ok, key="nope")


def lambda_async():
    async def h(site: str, device: str) -> None: ...

    return h


def test_overlapping_registration_and_bad_names():
    svc = Service("svc1")

    @svc.on("dt/{device}/x")
    async def a(device: str) -> None: ...

    with pytest.raises(ServiceError):

        @svc.on("dt/{d}/x")
        async def b(d: str) -> None: ...

    for bad in ("", "a b", "x/y", "-x"):
        with pytest.raises(ConfigError):
            Service(bad)


async def test_service_refuses_reentry_and_no_handlers():
    from edge.testing import MemoryBroker

    empty = Service("empty", broker=MemoryBroker())
    with pytest.raises(ServiceError):
        async with empty:
            pass
    svc = Service("twice", broker=MemoryBroker(), heartbeat=0)

    @svc.on("a/{k}")
    async def h(k: str) -> None: ...

    async with svc:
        with pytest.raises(ServiceError):
            async with svc:
                pass
    async with svc:  # sequential re-use is fine
        pass


def test_dedup_table_persists_expires_and_stays_bounded(tmp_path):
    path = str(tmp_path / "d.dedup")
    t = DedupTable(path, ttl=3600, max_entries=3)
    for i in range(5):
        t.add(f"id{i}")
    t.commit()
    assert len(t) == 3 and "id0" not in t and "id4" in t
    t.close()
    t2 = DedupTable(path, ttl=3600, max_entries=3)
    assert {"id2", "id3", "id4"} == {i for i in ("id0", "id1", "id2", "id3", "id4") if i in t2}
    t2.close()
    # an uncommitted mark is not durable (the message was not acknowledged either)
    t3 = DedupTable(path, ttl=3600, max_entries=10)
    t3.add("late")
    os.close(t3._fd)  # the process dies here
    t3._fd = None
    assert "late" not in DedupTable(path, ttl=3600, max_entries=10)
    # TTL
    t4 = DedupTable(None, ttl=0.05, max_entries=10)
    t4.add("x")
    assert "x" in t4
    deadline = time.monotonic() + 5
    while "x" in t4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "x" not in t4 and t4.expire() == 1 and len(t4) == 0


def test_dedup_log_is_compacted_and_stays_small(tmp_path):
    """The append-only log is rewritten with the live ids once it holds COMPACT_FACTOR x
    max_entries records: a long run keeps it bounded, and it reads back the same ids."""
    path = str(tmp_path / "d.dedup")
    t = DedupTable(path, max_entries=1000)
    for i in range(20_000):
        t.add(f"e{i}")
        if i % 7 == 0:
            t.commit()
    t.close()
    records = (os.path.getsize(path) - len(MAGIC)) // len(_record("e19999", 0.0))
    print(f"\n20,000 marks, max 1,000 ids: log holds about {records} records")
    assert records <= COMPACT_FACTOR * 1000
    t2 = DedupTable(path, max_entries=1000)
    assert len(t2) == 1000 and "e19999" in t2 and "e19000" in t2 and "e18999" not in t2
    # a re-marked id moves to the end and survives the oldest being forgotten
    t2.add("e19000")
    t2.add("new")
    t2.close()
    t3 = DedupTable(path, max_entries=1000)
    assert "e19000" in t3 and "new" in t3 and "e19001" not in t3
    t3.close()


def test_dedup_log_cut_tail_and_bad_header_are_recovered(tmp_path):
    """A write cut by a crash or a full disk leaves a short or garbled last record: it is
    cut off and the rest is kept. A file that is not a dedup log is moved aside."""
    path = str(tmp_path / "d.dedup")
    t = DedupTable(path, max_entries=100)
    for i in range(10):
        t.add(f"id{i}")
    t.commit()
    t.close()
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(_record("id10", time.time())[:-3])  # a torn write
    t = DedupTable(path, max_entries=100)
    assert len(t) == 10 and "id9" in t and "id10" not in t
    assert t.recovered == {"records": 10, "cut_bytes": len(_record("id10", 0.0)) - 3}
    assert os.path.getsize(path) == size
    t.add("id11")
    t.close()
    with open(path, "r+b") as f:  # flip a byte inside the 4th record: it and all after go
        f.seek(len(MAGIC) + 3 * len(_record("id0", 0.0)) + 6)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    t = DedupTable(path, max_entries=100)
    assert [i for i in ("id0", "id1", "id2", "id3", "id11") if i in t] == ["id0", "id1", "id2"]
    t.close()
    with open(path, "wb") as f:
        f.write(b"SQLite format 3\x00 not ours")
    t = DedupTable(path, max_entries=100)
    assert len(t) == 0
    t.add("fresh")
    t.close()
    assert "fresh" in DedupTable(path, max_entries=100)
    assert [p.name for p in tmp_path.glob("d.dedup.corrupt-*")]


def test_dedup_failed_write_is_cut_back(tmp_path, monkeypatch):
    """A write that fails half way (ENOSPC) is removed from the file, so later marks stay
    readable; the failed marks' messages were not acknowledged."""
    import edge._dedup as dd

    path = str(tmp_path / "d.dedup")
    t = DedupTable(path, max_entries=100)
    t.add("a")
    t.commit()
    real = dd._write_all

    def half_then_enospc(fd: int, buf: bytes) -> None:
        os.write(fd, buf[: len(buf) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dd, "_write_all", half_then_enospc)
    t.add("b")
    with pytest.raises(OSError):
        t.commit()
    monkeypatch.setattr(dd, "_write_all", real)
    t.add("c")
    t.commit()
    t.close()
    t2 = DedupTable(path, max_entries=100)
    assert "a" in t2 and "c" in t2 and "b" not in t2 and t2.recovered["cut_bytes"] == 0


def test_dedup_table_imports_the_sqlite_table_of_0_1(tmp_path):
    import sqlite3

    old = tmp_path / "svc.dedup.sqlite"
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, ts REAL NOT NULL) WITHOUT ROWID")
    now = time.time()
    db.executemany("INSERT INTO seen VALUES (?, ?)", [("old", now - 7200), ("kept", now - 5)])
    db.commit()
    db.close()
    t = DedupTable(str(tmp_path / "svc.dedup"), ttl=3600, max_entries=100)
    assert "kept" in t and "old" not in t and not old.exists()
    t.close()
    assert "kept" in DedupTable(str(tmp_path / "svc.dedup"), ttl=3600, max_entries=100)


def test_settings_precedence_and_credentials(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "broker: mqtt://10.0.0.1:1884\nnode_id: pi-9\nservice:\n  concurrency: 4\n"
        "  retries: 1\nmysvc:\n  threshold: 5\n"
    )

    class Cfg(BaseModel):
        threshold: int = 1

    svc = Service("mysvc", config=Cfg, retries=7)
    s = load_settings(
        OPTIONS,
        ["--config", str(cfg), "--retries", "2", "--username", "u"],
        prog="x",
        section="service",
        description="",
        environ={"EDGEFERRY_PASSWORD": "p"},
    )
    apply_settings(svc, s)
    assert (svc.concurrency, svc.retries, svc.node_id) == (4, 2, "pi-9")
    assert (svc.broker.host, svc.broker.port, svc.broker.username, svc.broker.password) == (
        "10.0.0.1",
        1884,
        "u",
        "p",
    )
    assert svc.config.threshold == 5 and svc.state_dir
    bad = tmp_path / "bad.yaml"
    bad.write_text("service:\n  concurency: 4\n")
    with pytest.raises(ConfigError, match="concurency"):
        load_settings(OPTIONS, ["--config", str(bad)], prog="x", section="service", description="")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("mysvc:\n  threshold: lots\n")
    s = load_settings(
        OPTIONS, ["--config", str(wrong)], prog="x", section="service", description=""
    )
    with pytest.raises(ConfigError, match="threshold"):
        apply_settings(svc, s)


def test_load_target(tmp_path, monkeypatch):
    (tmp_path / "mysvc_mod.py").write_text(
        "from edge import Service\nsvc = Service('fromfile')\nnot_a_service = 3\n"
        "def make():\n    return Service('made')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_target("mysvc_mod:svc").name == "fromfile"
    assert load_target("mysvc_mod:make").name == "made"
    for spec, msg in [
        ("mysvc_mod", "MODULE:ATTR"),
        ("nope_mod:svc", "no such module"),
        ("mysvc_mod:missing", "no attribute"),
        ("mysvc_mod:not_a_service", "not an edge.Service"),
    ]:
        with pytest.raises(ServiceError, match=msg):
            load_target(spec)


def test_import_edge_stays_light():
    code = (
        "import sys, edge, edge.mqtt; "
        "heavy = [m for m in ('pydantic', 'yaml', 'typer', 'rich', 'sqlite3') "
        "if m in sys.modules]; "
        "assert not heavy, heavy; from edge import Service; assert Service.__name__ == 'Service'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dedup_commit_is_short_enough_for_the_event_loop(tmp_path):
    """The service commits on the loop (one write per loop turn, now and then a rewrite of
    the live ids): a large batch must stay in the low milliseconds."""
    from edge.events import new_id

    t = DedupTable(str(tmp_path / "d.dedup"), max_entries=10_000)
    worst = 0.0
    for _ in range(COMPACT_FACTOR * 10 + 5):  # appends and one rewrite of 10,000 ids
        for _ in range(1000):
            t.add(new_id())
        t0 = time.perf_counter()
        t.commit()
        worst = max(worst, time.perf_counter() - t0)
    t.close()
    assert t._records < 20_000  # the rewrite happened
    print(f"\nworst commit of 1000 marks: {worst * 1000:.1f} ms")
    assert worst < 0.05


def test_plain_json_handlers_never_import_pydantic():
    """dict, list, str and untyped payloads are checked without pydantic (about 12 MiB of
    resident memory a service that does not use models should not pay); the wrong JSON
    kind is a schema dead letter, as a model mismatch is."""
    code = """
import asyncio, sys
from typing import Any
from edge import Service
from edge.testing import MemoryBroker, TestClient

svc = Service("plain", heartbeat=0)
seen = []

@svc.on("dt/{device}/obj")
async def obj(device: str, data: dict[str, Any]) -> None:
    seen.append(data)

@svc.on("dt/{device}/arr")
async def arr(device: str, data: list) -> None:
    seen.append(data)

@svc.on("dt/{device}/any")
async def anything(device: str, data) -> None:
    seen.append(data)

async def main():
    b = MemoryBroker()
    async with svc.running(b), TestClient(b) as tc:
        dlq = await tc.subscribe("dlq/plain")
        await tc.publish_event("dt/a/obj", {"v": 1})
        await tc.publish_event("dt/a/arr", [1, 2])
        await tc.publish("dt/a/any", b"3.5")
        await tc.publish_event("dt/b/obj", [1])
        [dead] = await dlq.wait(1)
        await svc.wait_until(lambda s: len(seen) == 3)
    assert seen == [{"v": 1}, [1, 2], 3.5], seen
    assert dead.event.data["reason"] == "schema", dead.event.data
    assert "expected an object, got an array" in dead.event.data["error"], dead.event.data
    assert svc.dead_lettered == {"schema": 1}
    assert "pydantic" not in sys.modules, "pydantic was imported"

asyncio.run(asyncio.wait_for(main(), 30))
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
