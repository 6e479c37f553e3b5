"""The MQTT client's read path on its own: ``python -m bench.mqtt_read [--against REF]``.

Feeds 100,000 small QoS 1 PUBLISH packets (a 24-byte topic, 60-byte payloads), in
64 KiB reads, to an :class:`edge.mqtt.MQTTClient` on a fake transport, and acknowledges
each read's messages with one ``ack_many`` (as the gateway does per commit); then a
16 MiB PUBLISH in 64 KiB reads. Prints microseconds per message and milliseconds per big
packet, best of ``--rounds``.

``--against REF`` runs the same in a subprocess on ``git archive REF edge`` too,
interleaved round by round (the machine is shared: A/B in the same run), and prints both.
No broker, no sockets: this is the client's parsing, delivery and acknowledgement cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

N = 100_000
TOPIC = b"dt/dev0001/temperature/x"
PAYLOAD = b'{"v": 21.5, "unit": "C", "ts": 1700000000000, "seq": 123456789}'[:60]
CHUNK = 65536


def _publish(pid: int, payload: bytes = PAYLOAD) -> bytes:
    body = len(TOPIC).to_bytes(2, "big") + TOPIC + pid.to_bytes(2, "big") + payload
    n = len(body)
    head = bytearray([0x32])
    while True:
        b, n = n % 128, n // 128
        head.append(b | 0x80 if n else b)
        if not n:
            break
    return bytes(head) + body


class _Transport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str) -> None:
        return None

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _client(on_message):  # type: ignore[no-untyped-def]
    from edge.mqtt import MQTTClient

    c = MQTTClient("mqtt://127.0.0.1:1", "bench", on_message=on_message, keepalive=600,
                   max_packet_bytes=32 * 1024 * 1024)
    loop = asyncio.get_running_loop()
    c._closed = loop.create_future()
    c._connack = loop.create_future()
    c._window = asyncio.Semaphore(64)
    c._alive = True  # the codec client's flag (ignored by the old one)
    c._transport = _Transport()  # type: ignore[assignment]
    c._feed(b"\x20\x02\x00\x00")
    await c._connack
    return c


async def _small() -> float:
    stream = b"".join(_publish(i % 65535 + 1) for i in range(N))
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    got: list[int] = []
    c = await _client(lambda m: got.append(m.pid))
    t0 = time.perf_counter()
    for ch in chunks:
        c._feed(ch)
        c.ack_many(got)
        got.clear()
    dt = time.perf_counter() - t0
    assert c._transport.written == 4 * N, c._transport.written  # type: ignore[union-attr]
    return dt / N * 1e6


async def _big() -> float:
    wire = _publish(1, b"x" * (16 * 1024 * 1024 - 64))
    got: list[int] = []
    c = await _client(lambda m: got.append(len(m.payload)))
    t0 = time.perf_counter()
    for i in range(0, len(wire), CHUNK):
        c._feed(wire[i : i + CHUNK])
    dt = time.perf_counter() - t0
    assert got == [16 * 1024 * 1024 - 64], got
    return dt * 1e3


def _once() -> dict[str, float]:
    return {"small_us_per_msg": asyncio.run(_small()), "big_16MiB_ms": asyncio.run(_big())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", metavar="REF", help="git ref to compare with, e.g. main~5")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.once:
        print(json.dumps(_once()))
        return
    root = Path(__file__).resolve().parent.parent
    trees = {"this tree": str(root)}
    tmp = None
    if args.against:
        tmp = tempfile.TemporaryDirectory()
        tar = subprocess.run(["git", "-C", str(root), "archive", args.against, "edge"],
                             check=True, capture_output=True).stdout
        path = Path(tmp.name) / "a.tar"
        path.write_bytes(tar)
        with tarfile.open(path) as tf:
            tf.extractall(tmp.name, filter="data")
        (Path(tmp.name) / "bench").mkdir()
        (Path(tmp.name) / "bench" / "__init__.py").write_text("")
        (Path(tmp.name) / "bench" / "mqtt_read.py").write_text(Path(__file__).read_text())
        trees = {args.against: tmp.name, "this tree": str(root)}
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, "-m", "bench.mqtt_read", "--once"], cwd=tree,
                                 env=env, check=True, capture_output=True, text=True).stdout
            r = json.loads(out)
            b = best.setdefault(label, r)
            for k, v in r.items():
                b[k] = min(b[k], v)
    print(f"best of {args.rounds} rounds, interleaved; {N:,} QoS 1 PUBLISH of {len(_publish(1))} bytes "
          "in 64 KiB reads, one ack_many per read; one 16 MiB PUBLISH in 64 KiB reads")
    for label, r in best.items():
        print(f"  {label:>12}: {r['small_us_per_msg']:.2f} us/message   {r['big_16MiB_ms']:.1f} ms per 16 MiB packet")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
