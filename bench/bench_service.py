"""Service SDK benchmark (issue 3): no-op edge.Services next to a bare aiomqtt receive
loop, against the same real Mosquitto (deploy/mosquitto/edge.conf on a free port), in
the same run.

For each consumer: its persistent QoS 1 session is created, the consumer goes away, N
CloudEvents telemetry messages (10 devices) are queued for it at the broker, and the
consumer comes back; it reports the time of its first and of its Nth message, so the
figure is its receive rate, not connection setup or the publisher's speed. All run as
child processes:

- bare: ``aiomqtt`` ``async for msg in client.messages`` counting (paho acknowledges);
- typed: ``edgeferry service run bench.svc_typed:typed`` — routing, envelope decode,
  pydantic validation into a model, per-device ordering, on-disk dedup table,
  acknowledgement after the handler;
- plain: ``bench.svc_plain:plain``, the same with a ``dict`` payload (no pydantic);

and their peak RSS (VmHWM) once all N are handled, and idle (subscribed, nothing queued).
Beside them, the floor: a process that only imports asyncio and uvloop (and pydantic,
defining the same model, for the typed floor) and holds one MQTT connection open — what
any uvloop service of that kind costs before the SDK adds a byte.

    .venv/bin/python -m bench --only service [--quick]
    .venv/bin/python -m bench.bench_service [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

__all__ = ["run", "summary"]

# ------------------------------------------------------------------ child: bare loop


async def _bare(url: str, n: int, prime: bool) -> None:
    import aiomqtt

    from edge.mqtt import parse_url

    u = parse_url(url)
    async with aiomqtt.Client(
        u.host, u.port, identifier="bench-bare", clean_session=False, max_queued_incoming_messages=0
    ) as c:
        await c.subscribe("dt/+/temperature", qos=1)
        if prime:
            print("READY", flush=True)
            return
        count = 0
        first = cpu = 0.0
        async for _msg in c.messages:
            count += 1
            if count == 1:
                first = time.perf_counter()
                cpu = time.process_time()
            if count == n:
                break
        print(
            "BENCH " + json.dumps({"count": count, "seconds": time.perf_counter() - first,
                                   "cpu_seconds": time.process_time() - cpu}),
            flush=True,
        )


# ------------------------------------------------------------------ child: the floor


def _floor(url: str, typed: bool) -> None:
    """asyncio + uvloop (+ pydantic and the model) + one MQTT connection, nothing else."""
    import asyncio

    import uvloop

    if typed:
        from pydantic import BaseModel

        class Reading(BaseModel):
            value: float
            unit: str = "C"

        Reading.model_validate({"value": 1.0})
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)

    async def go() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        client_id = b"bench-floor"
        var = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
        writer.write(bytes([0x10, len(var)]) + var)  # CONNECT, clean session, keepalive 60
        await writer.drain()
        connack = await reader.readexactly(4)
        if connack[3] != 0:
            raise RuntimeError(f"CONNACK {connack!r}")
        writer.close()

    uvloop.run(go())
    with open("/proc/self/status") as f:  # the peak, read once the connection closed
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print("BENCH " + json.dumps({"peak_rss_kb": hwm}), flush=True)


# ------------------------------------------------------------------ parent


def _publish(url: str, n: int) -> float:
    import asyncio

    from edge.events import encode, envelope
    from edge.mqtt import MQTTClient

    async def go() -> float:
        t0 = time.perf_counter()
        async with MQTTClient(url, "bench-pub", max_inflight=500) as c:
            for i in range(n):
                d = f"dev{i % 10}"
                body = encode(
                    envelope(
                        source=f"/bench/devices/{d}",
                        type="io.edgeferry.telemetry.temperature",
                        data={"value": 20.0 + (i % 100) / 10, "unit": "C"},
                        subject=d,
                    )
                )
                await c.publish_nowait(f"dt/{d}/temperature", body, 1)
            await c.drain()
        return time.perf_counter() - t0

    return asyncio.run(go())


def _result(proc: Any, timeout: float) -> dict[str, Any]:
    """The ``BENCH {json}`` line the child prints once it received everything."""
    m = proc.wait_for_line(r"^BENCH (\{.*\})$", timeout)
    result: dict[str, Any] = json.loads(m.group(1))
    return result


def run(quick: bool) -> dict[str, Any]:
    from bench._util import PY, Workdir, machine_info, mem_kb, wait_line

    n = 20_000 if quick else 100_000
    wd = Workdir("efbench-service-")
    broker = wd.broker("edge", "edge").start()
    out: dict[str, Any] = {"messages": n, "devices": 10, "machine": machine_info()}
    env = {"BENCH_N": str(n)}
    try:
        # bare aiomqtt loop
        prime = wd.proc(
            "bare-prime",
            [PY, "-m", "bench.bench_service", "--child-bare", broker.url, str(n), "1"],
            env=env,
        ).start()
        wait_line(prime, "READY")
        prime.terminate()
        out["publish_seconds_bare"] = round(_publish(broker.url, n), 3)
        bare = wd.proc(
            "bare",
            [PY, "-m", "bench.bench_service", "--child-bare", broker.url, str(n), "0"],
            env=env,
        ).start()
        r = _result(bare, 600)
        out["bare_msgs_per_s"] = round(r["count"] / r["seconds"])
        out["bare_cpu_us_per_msg"] = round(r["cpu_seconds"] / r["count"] * 1e6, 2)
        out["bare_peak_rss_kb"] = mem_kb(bare.pid).get("VmHWM", 0) if bare.running else None
        bare.terminate()

        for variant, target in (("typed", "bench.svc_typed:typed"),
                                ("plain", "bench.svc_plain:plain")):
            out[variant] = _service(broker.url, wd, target, n, env)
        for variant in ("typed", "plain"):
            floor = wd.proc(
                f"floor-{variant}",
                [PY, "-m", "bench.bench_service", "--child-floor", broker.url, variant],
            ).start()
            out[variant]["floor_peak_rss_kb"] = _result(floor, 60)["peak_rss_kb"]
        # the figures the issue names (the typed service is the one a user writes)
        out["service_msgs_per_s"] = out["typed"]["msgs_per_s"]
        out["service_peak_rss_kb"] = out["typed"]["peak_rss_kb"]
        out["ratio_service_to_bare"] = round(out["service_msgs_per_s"] / out["bare_msgs_per_s"], 3)
        out["targets"] = {"ratio_at_least": 0.8, "peak_rss_mb_below": 35}
        out["command"] = "python -m bench --only service" + (" --quick" if quick else "")
    finally:
        broker.stop()
        wd.cleanup()
    return out


def _service(url: str, wd: Any, target: str, n: int, env: dict[str, str]) -> dict[str, Any]:
    """Idle and burst figures of ``edgeferry service run TARGET``."""
    from bench._util import PY, mem_kb

    name = target.rsplit(":", 1)[1]
    argv = [
        PY,
        "-m",
        "edgeferry",
        "service",
        "run",
        target,
        "--broker",
        url,
        "--state-dir",
        str(wd / "state"),
        "--log-level",
        "WARNING",
        *os.environ.get("EFBENCH_SERVICE_ARGS", "").split(),
    ]
    out: dict[str, Any] = {"command": " ".join(["edgeferry", *argv[3:6]])}
    first = wd.proc(f"{name}-prime", argv, env={**env, "BENCH_N": "0"}).start()
    _wait_state(url, f"state/bench{name}", b"online")
    out["idle_rss_kb"] = mem_kb(first.pid).get("VmHWM")
    first.terminate()
    out["publish_seconds"] = round(_publish(url, n), 3)
    svc = wd.proc(name, argv, env=env).start()
    r = _result(svc, 600)
    out["msgs_per_s"] = round(r["count"] / r["seconds"])
    out["cpu_us_per_msg"] = round(r["cpu_seconds"] / r["count"] * 1e6, 2)
    out["peak_rss_kb"] = mem_kb(svc.pid).get("VmHWM")
    svc.terminate()
    return out


def _wait_state(url: str, topic: str, payload: bytes, timeout: float = 30) -> None:
    """Wait for a retained state message (the service is subscribed and online)."""
    import asyncio

    from edge.testing import TestClient

    async def go() -> None:
        async with TestClient(url) as tc:
            col = await tc.subscribe(topic)
            await col.wait(1, timeout, where=lambda m: m.payload == payload)

    asyncio.run(go())


def summary(res: dict[str, Any]) -> str:
    def mb(kb: int) -> str:
        return f"{kb / 1024:.1f} MiB"

    t, p = res["typed"], res["plain"]
    return "\n".join(
        [
            f"  messages              {res['messages']} "
            "(10 devices, CloudEvents JSON, QoS 1, queued then drained)",
            f"  bare aiomqtt loop     {res['bare_msgs_per_s']:>8} msg/s   "
            f"CPU {res.get('bare_cpu_us_per_msg', '?')} us/msg   peak {mb(res['bare_peak_rss_kb'])}",
            f"  typed no-op service   {t['msgs_per_s']:>8} msg/s   CPU {t.get('cpu_us_per_msg', '?')} us/msg   "
            f"peak {mb(t['peak_rss_kb'])}, idle {mb(t['idle_rss_kb'])}, floor {mb(t['floor_peak_rss_kb'])}",
            f"  plain no-op service   {p['msgs_per_s']:>8} msg/s   CPU {p.get('cpu_us_per_msg', '?')} us/msg   "
            f"peak {mb(p['peak_rss_kb'])}, idle {mb(p['idle_rss_kb'])}, floor {mb(p['floor_peak_rss_kb'])}",
            f"  ratio (typed / bare)  {res['ratio_service_to_bare']:.2f} (target >= 0.8)",
            "  target peak RSS       < 35 MB (floor: asyncio + uvloop [+ pydantic model] "
            "+ one connection, no SDK)",
        ]
    )


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child-bare":
        import asyncio

        asyncio.run(_bare(argv[1], int(argv[2]), argv[3] == "1"))
        return 0
    if argv and argv[0] == "--child-floor":
        _floor(argv[1], argv[2] == "typed")
        return 0
    res = run("--quick" in argv)
    print(summary(res))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
