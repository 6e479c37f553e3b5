"""Lifecycles that cannot swallow an error: when one task of a service or a fleet dies,
its exception comes out of ``serve()`` / ``async with`` / ``asyncio.run`` as itself (not as
a CancelledError or an ExceptionGroup), within a bounded time, and a process running a
service exits non-zero with the task's traceback."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
import uuid
from typing import Any

import pytest

from edge import Service
from edge.testing import MemoryBroker
from firmware_sim import Fleet
from firmware_sim.device import Device
from tests.test_sim_support import profile


class Boom(RuntimeError):
    pass


class CrashingHeartbeat(Service):
    """A service whose heartbeat task dies (a bug in a long-lived task of the service)."""

    def stats(self) -> dict[str, Any]:
        raise Boom("heartbeat task crashed")


def crashing_service(**kw: Any) -> Service:
    svc = CrashingHeartbeat("t" + uuid.uuid4().hex[:10], heartbeat=0.01, **kw)

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        pass

    return svc


def test_task_failure_comes_out_of_asyncio_run_as_itself() -> None:
    svc = crashing_service(broker=MemoryBroker())

    async def main() -> None:
        async with asyncio.timeout(10):
            await svc.serve()

    t0 = time.monotonic()
    with pytest.raises(Boom, match="heartbeat task crashed") as info:
        asyncio.run(main())
    took = time.monotonic() - t0
    print(f"\n[service crash] out as {type(info.value).__name__} after {took:.2f} s")
    # its own traceback: the frame that raised is in it
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "stats" in frames, frames
    assert took < 5


async def test_task_failure_ends_the_embedding_block_with_the_error() -> None:
    svc = crashing_service()
    with pytest.raises(Boom):
        async with asyncio.timeout(10), svc.running(MemoryBroker()):
            await asyncio.Event().wait()  # the body is cancelled when a task of svc dies
    assert not svc._entered
    # and it can run again afterwards (the lifecycle left nothing behind)
    svc2 = Service("t" + uuid.uuid4().hex[:10], heartbeat=0)

    @svc2.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        pass

    async with asyncio.timeout(10), svc2.running(MemoryBroker()):
        pass


async def test_outer_cancellation_still_stops_the_service() -> None:
    svc = Service("t" + uuid.uuid4().hex[:10], heartbeat=0)

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        pass

    broker = MemoryBroker()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2), svc.running(broker):
            await asyncio.Event().wait()
    assert not svc._entered and not svc.online
    assert broker.retained[f"state/{svc.name}"] == b"offline"


SERVICE = textwrap.dedent("""
    from edge import Service

    class Crashing(Service):
        def stats(self):
            raise RuntimeError("heartbeat task crashed")

    svc = Crashing("crasher", heartbeat=0.2)

    @svc.on("dt/{device}/x")
    async def handle(device: str, data: dict) -> None:
        pass
""")


def test_process_exits_nonzero_with_the_tasks_traceback(edge_broker, proc_factory, tmp_path):
    (tmp_path / "crasher_mod.py").write_text(SERVICE)
    argv = [
        sys.executable, "-m", "edgeferry", "service", "run", "crasher_mod:svc",
        "--broker", edge_broker.url, "--state-dir", str(tmp_path / "state"),
    ]
    p = proc_factory(argv, "crasher", cwd=tmp_path)
    p.wait_for_line(r"service crasher ready", 20)
    t0 = time.monotonic()
    rc = p.wait(20)
    text = p.log_text()
    print(f"\n[service process crash] exit {rc} {time.monotonic() - t0:.2f} s after ready")
    assert rc not in (0, None, -9), text
    assert "Traceback" in text and "RuntimeError: heartbeat task crashed" in text, text
    assert "in stats" in text, text
    # the task's exception itself, not wrapped in an ExceptionGroup or hidden behind a
    # CancelledError
    assert "CancelledError" not in text and "ExceptionGroup" not in text, text


async def test_fleet_device_task_failure_comes_out_as_itself(edge_broker, monkeypatch) -> None:
    run = Device.run

    async def crash_one(self: Device, t0: float) -> None:
        if self.name == "dev-0001":
            await asyncio.sleep(0.2)
            raise Boom("device task crashed")
        await run(self, t0)

    monkeypatch.setattr(Device, "run", crash_one)
    p = profile(devices=3, interval=0.1, seed=3)
    t0 = time.monotonic()
    with pytest.raises(Boom, match="device task crashed"):
        async with asyncio.timeout(20), Fleet(edge_broker.url, p, drain_timeout=2) as fleet:
            await fleet.run(60)
    took = time.monotonic() - t0
    print(f"\n[fleet crash] out as Boom after {took:.2f} s")
    assert took < 10
