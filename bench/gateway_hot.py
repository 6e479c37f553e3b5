"""Where a message's microseconds go in the gateway, stage by stage, in one process:
``python -m bench.gateway_hot [--rounds N] [--against REF]``.

A prepared byte stream of 20,000 QoS 1 PUBLISH packets (10 device topics, the load
generator's 100-byte payloads), in 64 KiB reads, goes through the gateway's own code:

1. parse: ``edge._codec.Decoder(raw=True).feed`` (packets -> tuples, as the intake parses);
2. deliver: the MQTT client's ``_feed`` (parse, packet-id bookkeeping, ``on_message``)
   into ``gateway.intake.Intake._on_message`` (lane, size checks, the pending batch),
   minus (1);
3. commit: ``Store.commit`` of the batch in chunks of 1,400 records (what a 200 ms group
   commit holds at 7,000 msg/s), SQLite in WAL mode with ``--sync full`` (fsync on a
   real file);
4. PUBACKs: ``MQTTClient.ack_many`` of each commit's packet ids (one write);
5. read back: what the uplink reads for its frames (``Store.read``, or the tail of the
   last commits where the code has one);
6. frame: ``gateway.frames.encode`` of 1,000 records.

Microseconds per message, best of ``--rounds``. ``--against REF`` runs the same on
``git archive REF`` (edge, gateway, edgeferry, firmware_sim) in a subprocess too,
interleaved round by round. No broker, no sockets, no event-loop wake-ups: the
per-message work only (the per-read and per-wake-up work is in the py-spy profile,
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

N = 20_000
CHUNK = 65536
BATCH = 1400


def _publish(topic: str, payload: bytes, pid: int) -> bytes:
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + pid.to_bytes(2, "big") + payload
    n = len(body)
    head = bytearray([0x32])
    while True:
        b, n = n % 128, n // 128
        head.append(b | 0x80 if n else b)
        if not n:
            return bytes(head) + body


async def _once() -> dict[str, float]:
    from edge._codec import Decoder
    from firmware_sim.loadgen import payload_for
    from gateway import frames
    from gateway.intake import Intake
    from gateway.settings import gateway_settings
    from gateway.state import State

    stream = b"".join(_publish(f"dt/dev{i % 10}/temp", payload_for("r", i, 100), i % 65535 + 1)
                      for i in range(N))
    reads = [stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        s = gateway_settings(["--local", "mqtt://127.0.0.1:9", "--cloud", "mqtt://127.0.0.1:9",
                              "--store", f"{d}/store.db", "--node-id", "hot", "--uplink", "dt/#"])
        st = State(s)
        st.store.open()
        st.opened()
        st.cloud_up = True
        intake = Intake(st)
        client = intake._new_client()
        client._got_connack = True
        client._alive = True
        client.pause_reading = lambda: None  # type: ignore[method-assign]
        written: list[int] = []
        client._write = lambda data: written.append(len(data))  # type: ignore[method-assign]

        dec = Decoder(raw=True)  # as the gateway's intake parses
        t0 = time.perf_counter()
        for r in reads:
            dec.feed(r)
        out["parse"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for r in reads:
            client._feed(r)
        out["deliver"] = time.perf_counter() - t0 - out["parse"]
        batch, st.pending = st.pending, []
        assert len(batch) == N, len(batch)

        commits = []
        t0 = time.perf_counter()
        for i in range(0, N, BATCH):
            part = batch[i:i + BATCH]
            commits.append((part, st.store.commit(part, {}, {})))
        out["commit"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for part, _ in commits:
            client.ack_many([r[4] for r in part])
        out["pubacks"] = time.perf_counter() - t0

        remember = getattr(st, "remember", None)
        lane = s.lanes[-1].name if len(s.lanes) == 1 else batch[0][0]
        rows: list[Any] = []
        t0 = time.perf_counter()
        sent = 0
        if remember is not None:  # the tail of the last commits
            for _part, res in commits:
                remember(res.inserted, res.first_seq, False)
                while True:
                    got = st.from_tail(lane, sent, s.frame_max_records, s.frame_max_bytes)
                    if not got:
                        break
                    rows.append(got)
                    sent = got[-1][0]
        else:
            while True:
                got = st.store.read(lane, sent, s.frame_max_records, s.frame_max_bytes)
                if not got:
                    break
                rows.append(got)
                sent = got[-1][0]
        out["read_back"] = time.perf_counter() - t0
        assert sum(len(r) for r in rows) == N, sum(len(r) for r in rows)

        t0 = time.perf_counter()
        prev = 0
        for r in rows:
            frames.encode("hot", st.store.epoch, lane, r, prev_seq=prev)
            prev = r[-1][0]
        out["frame"] = time.perf_counter() - t0
        st.store.close()
    return {k: round(v / N * 1e6, 3) for k, v in out.items()}


def _child() -> None:
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)  # as the gateway process runs (gateway/main.py)
    print(json.dumps(asyncio.run(_once())))


def _run(src: str | None) -> dict[str, float]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    r = subprocess.run([sys.executable, "-m", "bench.gateway_hot", "--child"], capture_output=True,
                       text=True, env=env, cwd=src or None, timeout=600)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--against", metavar="REF")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child()
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs: dict[str, list[dict[str, float]]] = {"this tree": []}
    with tempfile.TemporaryDirectory() as d:
        if a.against:
            tar = subprocess.run(["git", "-C", here, "archive", a.against, "edge", "gateway", "edgeferry",
                                  "firmware_sim", "bench"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", d], input=tar, check=True)
            from bench._uplink_pipelines import build_accelerator
            build_accelerator(d)  # as pip builds it in a checkout
            # this file runs the old tree's code
            with open(os.path.join(here, "bench", "gateway_hot.py"), "rb") as f:
                open(os.path.join(d, "bench", "gateway_hot.py"), "wb").write(f.read())
            runs[a.against] = []
        for i in range(a.rounds):
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                runs[name].append(_run(d if name != "this tree" else None))
    load = open("/proc/loadavg").read().split()[0]
    print(f"us per message, best of {a.rounds} (load average {load}):")
    for name, rs in runs.items():
        best = {k: min(r[k] for r in rs) for k in rs[0]}
        print(f"  {name:<12} " + "  ".join(f"{k} {v:.2f}" for k, v in best.items())
              + f"  total {sum(best.values()):.2f}")


if __name__ == "__main__":
    main()
