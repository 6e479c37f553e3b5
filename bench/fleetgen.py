"""Many gateways in one process: valid frames (gateway/frames.py) of N nodes on their real
topics ``ef/<node>/up/telemetry``, as gateways send them: interleaved across nodes, some
frames swapped with the next one of their node (a hole that the later one fills), some
sent twice (a resend after a lost PUBACK).

``python -m bench.fleetgen --broker URL --nodes 10000 --frames 2 --records 10``
prints ``publishing`` when it starts and ``BENCH {json}`` when every frame is
acknowledged by the broker, then answers ingest as gateways do (resends after a nack,
and of everything unconfirmed after an ingest hello without a session) until stopped.
``--per-row`` sends each record as its own message on ``fleet/<node>/<seq>`` instead (what a per-row consumer reads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

from edge.mqtt import MQTTClient
from gateway import frames
from gateway.topics import INGEST_HELLO

LANE = "telemetry"


def node_id(i: int) -> str:
    return f"site-{i:05d}"


def build(nodes: int, per_node: int, records: int, run: str, swap: float, dup: float,
          seed: int) -> tuple[list[tuple[str, bytes]], int]:
    """(topic, frame) in sending order, and the number of unique records."""
    rnd = random.Random(seed)
    now = int(time.time() * 1000)
    plan: list[list[tuple[str, bytes]]] = [[] for _ in range(per_node)]
    for i in range(nodes):
        node, epoch = node_id(i), 1_700_000_000_000_000 + i
        topic = f"ef/{node}/up/{LANE}"
        own = []
        for f in range(per_node):
            first = f * records + 1
            recs = [(s, now + s, f"dt/dev{s % 8}/temp",
                     b'{"run":"%s","node":%d,"n":%d,"v":%.2f}' % (run.encode(), i, s, rnd.random() * 40))
                    for s in range(first, first + records)]
            own.append((topic, frames.encode(node, epoch, LANE, recs, prev_seq=first - 1)))
        for f in range(per_node - 1):  # a frame overtaken by the next one
            if rnd.random() < swap:
                own[f], own[f + 1] = own[f + 1], own[f]
        for f in range(per_node):
            plan[f].append(own[f])
    out = [x for row in plan for x in row]
    for k in range(len(out)):  # resends: the same frame again, somewhat later
        if rnd.random() < dup:
            out.insert(min(len(out), k + 1 + rnd.randrange(1 + nodes)), out[k])
    return out, nodes * per_node * records


def build_rows(nodes: int, per_node: int, records: int, run: str) -> tuple[list[tuple[str, bytes]], int]:
    out = []
    for s in range(1, per_node * records + 1):
        for i in range(nodes):
            out.append((f"fleet/{node_id(i)}/{s}", b'{"run":"%s","node":%d,"n":%d,"v":1.5}' % (run.encode(), i, s)))
    return out, len(out)


class Gateways:
    """Answers ingest as the gateways would: a nack resends the node's frames after the
    seq it names, an ingest hello without a session resends what no confirmation covers."""

    def __init__(self, msgs: list[tuple[str, bytes]]) -> None:
        self.frames: dict[str, list[tuple[int, str, bytes]]] = {}
        for topic, payload in msgs:
            f = frames.decode(payload)
            self.frames.setdefault(f.node, []).append((f.records[-1][0], topic, payload))
        for v in self.frames.values():
            v.sort()
        self.confirmed: dict[str, int] = {}
        self.todo: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self.resent = 0
        self.client: MQTTClient | None = None

    def on_message(self, m: Any) -> None:
        if m.qos and self.client is not None:
            self.client.ack(m.pid)  # our client acknowledges only when told
        try:
            if m.topic == INGEST_HELLO:
                if not json.loads(m.payload).get("session_present", True):
                    for node in self.frames:
                        self.todo.put_nowait((node, self.confirmed.get(node, 0)))
                return
            node = m.topic.split("/")[1]
            d = json.loads(m.payload)
            if m.topic.endswith("/ack"):
                high = int(d["lanes"].get(LANE, 0))
                self.confirmed[node] = max(high, self.confirmed.get(node, 0))
            elif m.topic.endswith("/nack"):
                self.todo.put_nowait((node, int(d["after"])))
        except (ValueError, KeyError, IndexError):
            pass

    async def answer(self, c: MQTTClient) -> None:
        while True:
            node, after = await self.todo.get()
            for last, topic, payload in self.frames.get(node, []):
                if last > after and last > self.confirmed.get(node, 0):
                    await c.publish_nowait(topic, payload, 1)
                    self.resent += 1


async def send(url: str, msgs: list[tuple[str, bytes]], window: int, answer: bool) -> float:
    gws = Gateways(msgs) if answer else None
    c = MQTTClient(url, f"fleetgen-{random.randrange(1 << 30)}", clean_session=True, max_inflight=window,
                   on_message=gws.on_message if gws else None)
    await c.connect()
    if gws is not None:
        gws.client = c
        await c.subscribe([("ef/+/ack", 1), ("ef/+/nack", 1), (INGEST_HELLO, 1)])
    print("publishing", flush=True)
    t0 = time.monotonic()
    for topic, payload in msgs:
        await c.publish_nowait(topic, payload, 1)
    await c.drain()
    elapsed = time.monotonic() - t0
    print("BENCH " + json.dumps({"messages": len(msgs), "publish_s": round(elapsed, 3)}), flush=True)
    if gws is not None:  # go on answering until stopped
        task = asyncio.create_task(gws.answer(c))
        try:
            await c.closed
        finally:
            task.cancel()
    await c.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleetgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True)
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--frames", type=int, default=10, help="frames per node")
    p.add_argument("--records", type=int, default=100, help="records per frame")
    p.add_argument("--swap", type=float, default=0.02, help="share of frames overtaken by the next")
    p.add_argument("--dup", type=float, default=0.01, help="share of frames sent twice")
    p.add_argument("--window", type=int, default=200, help="QoS 1 publishes in flight")
    p.add_argument("--run", default="fleet")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--per-row", action="store_true", help="one message per record (fleet/<node>/<seq>)")
    a = p.parse_args(argv)
    if a.per_row:
        msgs, unique = build_rows(a.nodes, a.frames, a.records, a.run)
    else:
        msgs, unique = build(a.nodes, a.frames, a.records, a.run, a.swap, a.dup, a.seed)
    print(f"records {unique}", flush=True)
    asyncio.run(send(a.broker, msgs, a.window, not a.per_row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
