"""Lifecycles that cannot swallow an error (issue 9).

A task of the gateway (or of ingest) that fails ends ``run()`` with that task's own
exception and traceback, and the process with it and a non-zero status, within a
bounded time; SIGTERM still drains (docs/operations.md). Failures are injected with
hooks (gateway.state.Hooks; tests/_failpoint_gateway.py for a process), not sleeps.

Before the TaskGroups were owned by ``run()``, the first case ended in a bare
CancelledError (the real error only logged as "failed at shutdown"), and the second
hung for good, even after SIGTERM: the shutdown waited for a commit whose task had died.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edge.mqtt import MQTTClient
from gateway import frames
from gateway.gateway import Gateway
from gateway.ingest import Ingest
from gateway.settings import gateway_settings, ingest_settings
from gateway.state import Hooks
from gateway.topics import uplink_topic
from tests.harness import free_port, wait_until
from tests.pipeline import Pipeline, count_in_log
from tests.test_sim_support import until

pytestmark = pytest.mark.timeout(60)


class Boom(Exception):
    pass


async def publish(url: str, topic: str, payload: bytes) -> None:
    c = MQTTClient(url, f"lifecycle-pub-{free_port()}")
    await c.connect()
    await c.publish(topic, payload, 1)
    await c.close()


def _in_traceback(info: pytest.ExceptionInfo[BaseException], filename: str) -> bool:
    return any(Path(str(entry.path)).name == filename for entry in info.traceback)


async def test_a_failing_stage_comes_out_of_run_as_itself(tmp_path, edge_broker):
    settings = gateway_settings(["--local", edge_broker.url, "--cloud", f"mqtt://127.0.0.1:{free_port()}",
                                 "--store", str(tmp_path / "s.db"), "--node-id", "n1"])

    def after_commit(records: int) -> None:
        raise Boom(f"{records} records committed")

    gw = Gateway(settings, Hooks(after_commit=after_commit))
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    run = asyncio.create_task(gw.run(on_ready))
    await asyncio.wait_for(ready.wait(), 10)
    await until(lambda: gw.state.local_up, 10, "the local session")
    await publish(edge_broker.url, "dt/dev1/temp", b"21.5")
    with pytest.raises(Boom, match="1 records committed") as info:
        await asyncio.wait_for(run, 10)
    assert _in_traceback(info, "committer.py"), info.traceback
    with pytest.raises(RuntimeError, match="only once"):
        await gw.run()


async def test_a_failing_ingest_task_comes_out_of_run_as_itself(tmp_path, cloud_broker):
    settings = ingest_settings(["--cloud", cloud_broker.url, "--sink", f"jsonl:{tmp_path / 'sink.jsonl'}",
                                "--client-id", "ingest-lifecycle"])

    class Failing(Ingest):
        def _process(self, batch):  # type: ignore[no-untyped-def]
            raise Boom(f"{len(batch)} frames")

    ing = Failing(settings)
    run = asyncio.create_task(ing.run())
    await until(lambda: ing.counters["connects"] >= 1 and ing.status()["connected"], 10, "ingest connected")
    frame = frames.encode("n1", 1, "telemetry", [(1, 1795805035000, "dt/dev1/temp", b"21.5")], False, 0)
    await publish(cloud_broker.url, uplink_topic("n1", "telemetry"), frame)
    with pytest.raises(Boom, match="1 frames"):
        await asyncio.wait_for(run, 10)


@pytest.fixture
def pipe(tmp_path, broker_factory, proc_factory, chaos):
    return Pipeline(tmp_path, broker_factory, proc_factory, chaos)


def test_gateway_process_ends_with_the_failing_tasks_error_and_loses_nothing(pipe):
    """The committer dies after a commit, before acknowledging it (the shutdown used to
    wait for that commit forever): the process exits by itself with the error."""
    pipe.start_ingest()
    pipe.start_gateway(failpoint="raise_after_commit:2")
    load = pipe.load(2000, 2000, "die")
    failed = pipe.gateway
    t0 = time.monotonic()
    rc = failed.wait(15)
    print(f"[failing committer] exit status {rc} after {time.monotonic() - t0:.2f} s")
    text = failed.log_text()
    assert rc == 1, text[-3000:]
    assert "Traceback" in text and "Failpoint: failpoint raise_after_commit" in text
    assert "committer.py" in text  # the task's own frames
    assert "CancelledError" not in text and "failed at shutdown" not in text
    # what was committed but not acknowledged comes again and is recognised
    pipe.start_gateway()
    pipe.gateway.wait_for_line(r"local broker .* connected", 20)
    sent = pipe.wait_sent(load, 60)
    pipe.wait_delivered(sent, 60)
    r = pipe.tally("die", sent, label="committer failed after a commit, then restarted")
    assert (r["lost"], r["duplicated"], r["unexpected"], r["out_of_order"]) == (0, 0, 0, 0), r


def test_sigterm_drains_and_exits_cleanly(pipe):
    """docs/operations.md: on SIGTERM the gateway acknowledges what it committed, leaves
    the local broker with DISCONNECT and exits 0; the next run finds nothing to redeliver."""
    pipe.start()
    sent = pipe.wait_sent(pipe.load(1000, 0, "term"), 30)
    wait_until(lambda: pipe.status()["counters"]["stored"] >= sent, 20, "all stored")
    mark = pipe.edge.mark()
    rc = pipe.gateway.terminate(timeout=10)
    assert rc == 0, pipe.gateway.log_tail()
    pipe.edge.wait_for_log(r"Client edgeferry-gw-pi-1 disconnected\.", 10, since=mark)
    pipe.start_gateway()
    pipe.gateway.wait_for_line(r"local broker .* connected \(session resumed\)", 20)
    pipe.wait_delivered(sent, 60)
    r = pipe.tally("term", sent, label="SIGTERM drain, restart")
    assert (r["lost"], r["duplicated"], r["unexpected"], r["out_of_order"]) == (0, 0, 0, 0), r
    assert count_in_log(pipe.gateway.log_text(), r"redelivered messages were already stored") == 0
