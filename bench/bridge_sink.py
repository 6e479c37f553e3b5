"""The cloud-side sink of the Mosquitto-bridge pipeline, in its own process as ingest is.

One persistent QoS 1 session on the cloud broker (our MQTTClient); each received
message becomes one JSON line with the same keys ingest writes (node, epoch, seq, lane,
topic, payload, ts); a group of lines is written and flushed, and only then are its
messages acknowledged, so a kill -9 loses nothing.

    python -m bench.bridge_sink --cloud mqtt://127.0.0.1:PORT --sink PATH \\
        [--client-id bench-bridge-sink] [--filter 'dt/#']

Prints ``sink ready`` on stderr once subscribed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import Any

from edge.backoff import Backoff
from edge.errors import ConnectError, ConnectionLost
from edge.mqtt import Message, MQTTClient
from gateway.sinks import rfc3339

try:
    import orjson

    _dumps = orjson.dumps
except ImportError:  # pragma: no cover
    import json

    def _dumps(obj: Any) -> bytes:  # type: ignore[misc]
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class BridgeSink:
    def __init__(self, cloud: str, path: str, client_id: str, filt: str) -> None:
        self.cloud, self.path, self.client_id, self.filt = cloud, path, client_id, filt
        self.batch: list[Message] = []
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.client: MQTTClient | None = None
        self.seq = 0

    def on_message(self, m: Message) -> None:
        self.batch.append(m)
        self.wake.set()

    async def connection_loop(self) -> None:
        backoff = Backoff(0.2, 1.0)
        first = True
        while not self.stop.is_set():
            c = MQTTClient(self.cloud, self.client_id, clean_session=False, keepalive=10,
                           on_message=self.on_message)
            self.batch = []
            self.client = c
            try:
                await c.connect()
                await c.subscribe([(self.filt, 1)])
            except (ConnectError, ConnectionLost) as e:
                print(f"bridge_sink: {e}", file=sys.stderr, flush=True)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            if first:
                print("sink ready", file=sys.stderr, flush=True)
                first = False
            try:
                await c.closed
            except ConnectionLost:
                pass

    async def writer(self, f) -> None:  # type: ignore[no-untyped-def]
        while not self.stop.is_set():
            await self.wake.wait()
            self.wake.clear()
            batch, self.batch = self.batch, []
            if not batch:
                continue
            client = self.client
            now_ms = int(time.time() * 1000)
            ts = rfc3339(now_ms)
            out = []
            for m in batch:
                self.seq += 1
                try:
                    text = m.payload.decode()
                except UnicodeDecodeError:
                    text = m.payload.hex()
                out.append(_dumps({"node": "bridge", "epoch": 0, "seq": self.seq,
                                   "lane": "telemetry", "topic": m.topic, "payload": text,
                                   "ts": ts}))
            out.append(b"")
            f.write(b"\n".join(out))
            f.flush()
            if client is not None and client is self.client and client.connected:
                client.ack_many([m.pid for m in batch if m.qos])
            await asyncio.sleep(0)  # let more messages gather while we wrote

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        with open(self.path, "ab") as f:  # noqa: ASYNC230 - once, before anything runs
            async with asyncio.TaskGroup() as tg:
                conn = tg.create_task(self.connection_loop(), name="connection")
                wr = tg.create_task(self.writer(f), name="writer")
                await self.stop.wait()
                conn.cancel()
                wr.cancel()
        if self.client is not None and self.client.connected:
            await self.client.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bridge_sink", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cloud", required=True)
    p.add_argument("--sink", required=True)
    p.add_argument("--client-id", default="bench-bridge-sink")
    p.add_argument("--filter", default="dt/#")
    a = p.parse_args(argv)
    sink = BridgeSink(a.cloud, a.sink, a.client_id, a.filter)
    try:
        import uvloop

        return uvloop.run(sink.main())
    except ImportError:  # pragma: no cover
        return asyncio.run(sink.main())


if __name__ == "__main__":
    sys.exit(main())
