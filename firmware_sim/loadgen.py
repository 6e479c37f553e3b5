"""A flow-controlled QoS 1 load generator: numbered messages, nothing left unsent.

Unlike ``mosquitto_pub -l``, it exits only after the broker acknowledged every message,
so a zero-loss test can count on what it says it sent. Each payload is JSON with the
message number ``n`` (and the run id ``run``), padded to ``--size`` bytes.

    python -m firmware_sim.loadgen --broker mqtt://127.0.0.1:1883 --count 100000 \\
        --topic 'dt/dev{d}/temp' --devices 10 [--rate 1000] [--size 100] [--qos 1]

Prints ``sent N`` at the end (and ``progress N`` lines with --progress).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from edge.mqtt import MQTTClient

__all__ = ["generate", "payload_for"]


def payload_for(run: str, n: int, size: int) -> bytes:
    base = json.dumps({"run": run, "n": n, "v": round(20 + (n % 100) / 10, 1)}, separators=(",", ":"))
    pad = size - len(base) - len(',"pad":""')
    if pad > 0:
        base = base[:-1] + ',"pad":"' + "x" * pad + '"}'
    return base.encode()


async def generate(
    broker: str, count: int, *, topic: str = "dt/dev{d}/temp", devices: int = 1, rate: float = 0.0,
    size: int = 100, qos: int = 1, run: str = "r", start: int = 0, window: int = 1000,
    client_id: str | None = None, progress: bool = False,
) -> int:
    """Publish ``count`` messages numbered from ``start``; return how many were acknowledged."""
    cid = client_id or f"loadgen-{run}-{time.monotonic_ns() % 10**9}"
    async with MQTTClient(broker, cid, max_inflight=window) as c:
        topics = [topic.format(d=d) for d in range(devices)]
        t0 = time.monotonic()
        for i in range(start, start + count):
            if rate:
                due = t0 + (i - start) / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await c.publish_nowait(topics[i % devices], payload_for(run, i, size), qos)
            if progress and (i - start) % 10000 == 0:
                print(f"progress {i - start}", flush=True)
        await c.drain()
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m firmware_sim.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--topic", default="dt/dev{d}/temp")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.0, help="messages/s (0: as fast as acked)")
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--qos", type=int, default=1, choices=(0, 1))
    p.add_argument("--run", default="r")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    n = asyncio.run(generate(a.broker, a.count, topic=a.topic, devices=a.devices, rate=a.rate,
                             size=a.size, qos=a.qos, run=a.run, start=a.start, window=a.window,
                             progress=a.progress))
    dt = time.perf_counter() - t0
    print(f"sent {n} in {dt:.3f} s ({n / dt:.0f} msg/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
