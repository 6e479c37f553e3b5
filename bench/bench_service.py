"""Service SDK benchmark (issue 3): a no-op edge.Service next to a bare aiomqtt receive
loop, against the same real Mosquitto (deploy/mosquitto/edge.conf on a free port), in
the same run.

For each consumer: its persistent QoS 1 session is created, the consumer goes away, N
CloudEvents telemetry messages (10 devices) are queued for it at the broker, and the
consumer comes back; it reports the time of its first and of its Nth message, so the
figure is its receive rate, not connection setup or the publisher's speed. Both run as
child processes:

- bare: ``aiomqtt`` ``async for msg in client.messages`` counting (paho acknowledges);
- service: ``edgeferry service run bench.bench_service:noop`` — routing, envelope decode,
  pydantic validation, per-device ordering, on-disk dedup table, acknowledgement after the
  handler — and its peak RSS (VmHWM) once all N are handled.

    .venv/bin/python -m bench --only service [--quick]
    .venv/bin/python -m bench.bench_service [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from pydantic import BaseModel

from edge import Service

__all__ = ["noop", "run", "summary"]


class Reading(BaseModel):
    value: float
    unit: str = "C"


noop = Service("benchnoop", heartbeat=0, description="does nothing, as fast as it can")
_state = {"n": 0, "first": 0.0}
_TARGET = int(os.environ.get("BENCH_N", "0") or 0)


@noop.on("dt/{device}/temperature")
async def _nothing(device: str, reading: Reading) -> None:
    n = _state["n"] = _state["n"] + 1
    if n == 1:
        _state["first"] = time.perf_counter()
    if n == _TARGET:
        print(
            "BENCH " + json.dumps({"count": n, "seconds": time.perf_counter() - _state["first"]}),
            flush=True,
        )


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
        first = 0.0
        async for _msg in c.messages:
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == n:
                break
        print(
            "BENCH " + json.dumps({"count": count, "seconds": time.perf_counter() - first}),
            flush=True,
        )


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
    from bench._util import wait_for

    def done() -> Any:
        for line in proc.log_text().splitlines():
            if line.startswith("BENCH "):
                return json.loads(line[6:])
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_text()[-2000:]}")
        return None

    return wait_for(done, timeout, what=f"{proc.name} to receive everything")


def run(quick: bool) -> dict[str, Any]:
    from bench._util import PY, Broker, Proc, Workdir, machine_info, mem_kb

    n = 20_000 if quick else 100_000
    wd = Workdir("efbench-service-")
    broker = Broker(wd, "edge", "edge").start()
    out: dict[str, Any] = {"messages": n, "devices": 10, "machine": machine_info()}
    env = {"BENCH_N": str(n)}
    try:
        # bare aiomqtt loop
        prime = Proc(
            wd,
            "bare-prime",
            [PY, "-m", "bench.bench_service", "--child-bare", broker.url, str(n), "1"],
            env=env,
        ).start()
        prime.wait_log("READY")
        prime.terminate()
        out["publish_seconds_bare"] = round(_publish(broker.url, n), 3)
        bare = Proc(
            wd,
            "bare",
            [PY, "-m", "bench.bench_service", "--child-bare", broker.url, str(n), "0"],
            env=env,
        ).start()
        r = _result(bare, 600)
        out["bare_msgs_per_s"] = round(r["count"] / r["seconds"])
        out["bare_peak_rss_kb"] = mem_kb(bare.pid).get("VmHWM", 0) if bare.alive() else None
        bare.terminate()

        # no-op service
        svc_argv = [
            PY,
            "-m",
            "edgeferry",
            "service",
            "run",
            "bench.bench_service:noop",
            "--broker",
            broker.url,
            "--state-dir",
            str(wd / "state"),
            "--log-level",
            "WARNING",
            *os.environ.get("EFBENCH_SERVICE_ARGS", "").split(),
        ]
        first = Proc(wd, "service-prime", svc_argv, env={**env, "BENCH_N": "0"}).start()
        _wait_state(broker.url, "state/benchnoop", b"online")
        out["service_idle_rss_kb"] = mem_kb(first.pid).get("VmHWM")
        first.terminate()
        out["publish_seconds_service"] = round(_publish(broker.url, n), 3)
        svc = Proc(wd, "service", svc_argv, env=env).start()
        r = _result(svc, 600)
        out["service_msgs_per_s"] = round(r["count"] / r["seconds"])
        mem = mem_kb(svc.pid)
        out["service_peak_rss_kb"] = mem.get("VmHWM")
        out["service_rss_kb"] = mem.get("VmRSS")
        svc.terminate()
        out["ratio_service_to_bare"] = round(out["service_msgs_per_s"] / out["bare_msgs_per_s"], 3)
        out["targets"] = {"ratio_at_least": 0.8, "peak_rss_mb_below": 35}
        out["command"] = "python -m bench --only service" + (" --quick" if quick else "")
    finally:
        broker.stop()
        wd.cleanup()
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
    return "\n".join(
        [
            f"  messages              {res['messages']} "
            "(10 devices, CloudEvents JSON, QoS 1, queued then drained)",
            f"  bare aiomqtt loop     {res['bare_msgs_per_s']:>8} msg/s",
            f"  no-op edge.Service    {res['service_msgs_per_s']:>8} msg/s",
            f"  ratio                 {res['ratio_service_to_bare']:.2f} (target >= 0.8)",
            f"  service peak RSS      {res['service_peak_rss_kb'] / 1024:.1f} MB (target < 35 MB)",
        ]
    )


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child-bare":
        import asyncio

        asyncio.run(_bare(argv[1], int(argv[2]), argv[3] == "1"))
        return 0
    res = run("--quick" in argv)
    print(summary(res))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
