"""Ingest fed by many gateways at once: a batch of frames from as many nodes as there are
frames needs one confirmation per node; ingest must not stall on them."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from edge.mqtt import MQTTClient
from gateway import frames
from tests.harness import wait_until

pytestmark = pytest.mark.timeout(60)
PY = sys.executable


async def _publish(url: str, nodes: int, records: int) -> None:
    c = MQTTClient(url, "many-gateways", clean_session=True, max_inflight=200)
    await c.connect()
    now = int(time.time() * 1000)
    for i in range(nodes):
        node = f"site-{i:04d}"
        recs = [(s, now, "dt/d/t", b'{"n":%d}' % s) for s in range(1, records + 1)]
        await c.publish_nowait(f"ef/{node}/up/telemetry", frames.encode(node, 1, "telemetry", recs), 1)
    await c.drain()
    await c.close()


def test_frames_of_400_nodes_at_once(tmp_path, cloud_broker, proc_factory):
    from gateway.sinks import read_sink

    sink = f"sqlite:{tmp_path / 'sink.db'}"
    ing = proc_factory([PY, "-m", "edgeferry", "ingest", "run", "--cloud", cloud_broker.url, "--sink", sink,
                        "--downlink", "false"], "ingest")
    ing.wait_for_line(r"ingest connected", 20)
    asyncio.run(_publish(cloud_broker.url, 400, 10))

    def rows() -> int:
        return len(read_sink(sink)) if (tmp_path / "sink.db").exists() else 0

    wait_until(lambda: rows() >= 4000, 30, "4000 rows from 400 nodes")
    print(f"[400 nodes at once] sent=4000 delivered={rows()}")
    assert rows() == 4000
