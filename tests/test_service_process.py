"""Services as real processes (``edgeferry service run``) on a real Mosquitto: kill -9 in
the middle of a handler, a crash between the dedup commit and the acknowledgement, and
SIGTERM draining. Each test prints what it counted."""

import asyncio
import collections
import sys
import textwrap
from pathlib import Path

from edge import Event, Service
from edge.testing import TestClient

SERVICE = textwrap.dedent("""
    import asyncio
    import os
    from edge import Service

    svc = Service("worker", heartbeat=0)
    MARK = os.environ.get("CRASH_MARK", "")
    RUNS = os.environ["RUNS_FILE"]

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        with open(RUNS, "a") as f:
            f.write(f"{data['n']}\\n")
        print(f"working {data['n']}", flush=True)
        await svc.publish(f"evt/applied/{device}", data)
        if MARK and data["n"] == 3 and not os.path.exists(MARK):
            open(MARK, "w").close()
            print("handler blocked", flush=True)
            await asyncio.Event().wait()
        if data.get("slow"):
            await asyncio.sleep(data["slow"])  # the work itself, not synchronisation
        await svc.publish(f"evt/done/{device}", data)
""")


def start_worker(proc_factory, tmp_path, broker, name, crash_after_commit=None, **env):
    (tmp_path / "worker_mod.py").write_text(SERVICE)
    if crash_after_commit is None:
        launcher = ["-m", "edgeferry", "service", "run"]
    else:  # the same, with a crash passed in as the service's after_commit hook
        launcher = [str(Path(__file__).with_name("failpoint_service.py")), str(crash_after_commit)]
    argv = [
        sys.executable,
        *launcher,
        "worker_mod:svc",
        "--broker",
        broker.url,
        "--state-dir",
        str(tmp_path / "state"),
        "--log-level",
        "INFO",
        "--drain-timeout",
        "10s",
    ]
    p = proc_factory(argv, name, env={"RUNS_FILE": str(tmp_path / "runs.txt"), **env}, cwd=tmp_path)
    p.wait_for_line(r"service worker ready", 20)
    return p


def runs(tmp_path):
    return collections.Counter(int(x) for x in (tmp_path / "runs.txt").read_text().split())


async def test_kill9_mid_handler_redelivery_does_not_double_apply(
    edge_broker, proc_factory, tmp_path
):
    """The handler publishes its effect, then the process is killed before the handler
    returns. The broker redelivers, the handler runs again and publishes the same event id,
    and a deduplicating consumer applies every effect exactly once."""
    ledger = Service("ledger", heartbeat=0)
    applied: list[int] = []

    @ledger.on("evt/applied/{device}")
    async def apply(device: str, data: dict, event: Event) -> None:
        applied.append(data["n"])

    mark = tmp_path / "blocked"
    async with ledger.running(edge_broker.url), TestClient(edge_broker.url) as tc:
        wire = await tc.subscribe("evt/applied/#")
        w1 = await asyncio.to_thread(
            start_worker, proc_factory, tmp_path, edge_broker, "worker1", CRASH_MARK=str(mark)
        )
        for n in range(1, 6):
            await tc.publish_event("dt/a/x", {"n": n})
        await asyncio.to_thread(w1.wait_for_line, r"handler blocked", 20)
        await wire.wait(3)
        await asyncio.to_thread(w1.kill9)
        await asyncio.to_thread(start_worker, proc_factory, tmp_path, edge_broker, "worker2")
        await ledger.wait_until(lambda s: sorted(set(applied)) == [1, 2, 3, 4, 5], 20)
        await tc.settle()
        copies = collections.defaultdict(set)
        count = collections.Counter()
        for m in wire.messages:
            ev = m.event
            copies[ev.data["n"]].add(ev.id)
            count[ev.data["n"]] += 1
    handler_runs = runs(tmp_path)
    print(
        f"\nhandler runs {dict(handler_runs)}; on the wire {dict(count)}; applied {applied}; "
        f"ledger duplicates {ledger.counters['duplicates']}"
    )
    assert handler_runs[3] == 2, "the handler in flight at the kill must run again"
    assert handler_runs[1] == handler_runs[2] == 1, "acknowledged messages must not come back"
    assert count[3] == 2 and len(copies[3]) == 1, "the re-run publishes the same event id"
    assert applied == [1, 2, 3, 4, 5], "every effect applied once, in order"
    assert ledger.counters["duplicates"] == 1


async def test_crash_after_dedup_commit_before_ack_is_suppressed(
    edge_broker, proc_factory, tmp_path
):
    """SIGKILL right after the dedup table committed a handled id but before the PUBACK:
    the broker redelivers, and the restarted service acknowledges without running the
    handler again."""
    async with TestClient(edge_broker.url) as tc:
        done = await tc.subscribe("evt/done/#")
        w1 = await asyncio.to_thread(
            start_worker,
            proc_factory,
            tmp_path,
            edge_broker,
            "worker1",
            crash_after_commit=1,
        )
        await tc.publish_event("dt/a/x", {"n": 1})
        await asyncio.to_thread(w1.wait_for_line, r"failpoint service_crash_after_commit", 20)
        rc = await asyncio.to_thread(w1.wait, 20)
        assert rc == -9
        w2 = await asyncio.to_thread(start_worker, proc_factory, tmp_path, edge_broker, "worker2")
        await tc.publish_event("dt/a/x", {"n": 2})
        await done.wait(2, where=lambda m: True)
        await asyncio.to_thread(w2.wait_for_line, r"working 2", 20)
        await asyncio.to_thread(w2.terminate, 10)
    stopped = w2.log_text()
    handler_runs = runs(tmp_path)
    print(
        f"\nhandler runs {dict(handler_runs)}; restarted service: "
        f"{[line for line in stopped.splitlines() if 'stopped' in line]}"
    )
    assert handler_runs == {1: 1, 2: 1}
    assert "'duplicates': 1" in stopped, "the redelivered message was answered by the dedup table"


async def test_sigterm_drains_in_flight_handler_and_exits_cleanly(
    edge_broker, proc_factory, tmp_path
):
    async with TestClient(edge_broker.url) as tc:
        state = await tc.subscribe("state/worker")
        done = await tc.subscribe("evt/done/#")
        w1 = await asyncio.to_thread(start_worker, proc_factory, tmp_path, edge_broker, "worker1")
        await state.wait(1, where=lambda m: m.payload == b"online")
        await tc.publish_event("dt/a/x", {"n": 1, "slow": 1.0})
        mark = w1.mark()
        await asyncio.to_thread(w1.wait_for_line, r"working 1", 20)
        w1.signal(15)  # SIGTERM while the handler is still working
        await asyncio.to_thread(w1.wait_for_line, r"stop requested, draining", 20, mark)
        rc = await asyncio.to_thread(w1.wait, 20)
        [msg] = await done.wait(1)
        await state.wait(1, where=lambda m: m.payload == b"offline")
        assert rc == 0 and msg.event.data["n"] == 1
        # it was acknowledged: the next run gets only the new message
        w2 = await asyncio.to_thread(start_worker, proc_factory, tmp_path, edge_broker, "worker2")
        await tc.publish_event("dt/a/x", {"n": 2})
        await done.wait(2)
        await asyncio.to_thread(w2.wait_for_line, r"working 2", 20)
    assert runs(tmp_path) == {1: 1, 2: 1}
    assert "working 1" not in w2.log_text()
