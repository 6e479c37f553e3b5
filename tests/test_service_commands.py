"""``@svc.command``, ``svc.on_desired`` and ``svc.report`` on the in-memory broker, and the
built-in services on the same contract (docs/commands.md, docs/shadow.md)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from edge import Service
from edge.downlink import COMMAND_TYPE, SystemClock
from edge.services import aggregator
from edge.testing import MemoryBroker, TestClient


class Interval(BaseModel):
    seconds: float


def make_service(tmp_path: Any) -> tuple[Service, list[Any]]:
    svc = Service("dev", heartbeat=0, state_dir=str(tmp_path))
    ran: list[Any] = []

    @svc.command("set_interval")
    async def set_interval(interval: float, unit: str = "s") -> dict[str, Any]:
        ran.append(("set_interval", interval, unit))
        return {"interval": interval}

    @svc.command("configure")
    async def configure(cfg: Interval) -> None:
        ran.append(("configure", cfg.seconds))

    @svc.command("explode")
    async def explode() -> None:
        ran.append(("explode",))
        raise RuntimeError("boom")

    return svc, ran


async def command(tc: TestClient, name: str, cid: str, args: Any, ttl_ms: int | None = 60_000,
                  mono: float | None = None) -> None:
    clock = SystemClock()
    data = {"name": name, "args": args, "ttl_ms": ttl_ms,
            "mono": clock.monotonic() if mono is None else mono, "boot": clock.boot()}
    await tc.publish_event(f"cmd/dev/{name}", data, id=cid, type=COMMAND_TYPE)


def statuses(out: Any) -> list[tuple[str, str]]:
    return [(m.event.data["id"], m.event.data["status"]) for m in out.messages]


async def test_commands_run_once_with_typed_args_and_statuses(tmp_path) -> None:
    svc, ran = make_service(tmp_path)
    broker = MemoryBroker()
    async with svc.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("evt/cmd/dev")
        await command(tc, "set_interval", "c1", {"interval": 2})
        await command(tc, "configure", "c2", {"seconds": 3})
        await command(tc, "explode", "c3", {})
        await command(tc, "set_interval", "c4", {"interval": "fast"})  # bad type
        await command(tc, "set_interval", "c5", {"interval": 1, "colour": "red"})  # unknown arg
        await command(tc, "launch", "c6", {})  # unknown command
        await command(tc, "set_interval", "c7", {"interval": 9}, mono=SystemClock().monotonic() - 61)
        await command(tc, "set_interval", "c1", {"interval": 2})  # a redelivery
        await out.wait(10)
        await tc.settle()
    got = statuses(out)
    print(f"[sdk commands] sent=8 executed={len(ran)} statuses={got}", flush=True)
    assert ran == [("set_interval", 2.0, "s"), ("configure", 3.0), ("explode",)]
    assert got == [("c1", "accepted"), ("c1", "succeeded"), ("c2", "accepted"), ("c2", "succeeded"),
                   ("c3", "accepted"), ("c3", "failed"), ("c4", "rejected"), ("c5", "rejected"),
                   ("c6", "rejected"), ("c7", "expired")]
    replies = {m.event.data["id"]: m.event.data for m in out.messages}
    assert replies["c1"]["reply"] == {"interval": 2.0} and replies["c3"]["error"] == "boom"
    assert "launch" in replies["c6"]["error"]


async def test_started_without_outcome_is_not_run_again(tmp_path) -> None:
    svc, ran = make_service(tmp_path)
    journal = svc._commands._open_log()
    journal.add("s:c9")  # what a process killed inside the handler leaves behind
    journal.commit()
    broker = MemoryBroker()
    async with svc.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("evt/cmd/dev")
        await command(tc, "set_interval", "c9", {"interval": 2})
        [m] = await out.wait(1)
    assert ran == [] and m.event.data["status"] == "failed" and "interrupted" in m.event.data["error"]


async def test_desired_handler_sees_no_older_version_after_a_newer_one(tmp_path) -> None:
    svc = Service("dev", heartbeat=0)
    seen: list[Any] = []

    @svc.on_desired("dev")
    async def on_desired(doc: dict[str, Any]) -> None:
        seen.append(doc)
        await svc.report("dev", {"interval": doc["interval"]})

    broker = MemoryBroker()
    async with svc.running(broker), TestClient(broker) as tc:
        out = await tc.subscribe("shadow/dev/reported")
        for v, interval in ((1, 10), (3, 30), (2, 20)):
            await tc.publish("shadow/dev/desired", {"version": v, "desired": {"interval": interval}}, retain=True)
        await out.wait(2)
        await tc.settle()
    assert seen == [{"interval": 10}, {"interval": 30}]
    assert svc.desired("dev") == {"interval": 30}
    assert [m.json for m in out.messages] == [{"interval": 10}, {"interval": 30}]


async def test_aggregator_answers_set_interval_and_desired_interval() -> None:
    svc = aggregator.service
    svc.heartbeat = 0
    svc.load_config({"window": "60s"})
    broker = MemoryBroker()
    try:
        async with svc.running(broker), TestClient(broker) as tc:
            out = await tc.subscribe("evt/cmd/aggregator")
            rep = await tc.subscribe("shadow/aggregator/reported")
            await tc.publish_event("cmd/aggregator/set_interval", {"name": "set_interval",
                                   "args": {"interval": 5}, "ttl_ms": 10_000}, id="a1", type=COMMAND_TYPE)
            await tc.publish_event("cmd/aggregator/ota", {"name": "ota", "args": {}, "ttl_ms": 10_000},
                                   id="a2", type=COMMAND_TYPE)
            await out.wait(3)
            assert svc.config.window == 5
            await tc.publish("shadow/aggregator/desired", {"version": 1, "desired": {"interval": 30}})
            await rep.wait(2)
            await tc.settle()
            assert svc.config.window == 30
        assert statuses(out) == [("a1", "accepted"), ("a1", "succeeded"), ("a2", "rejected")]
        assert [m.json for m in rep.messages] == [{"interval": 5.0}, {"interval": 30.0}]
    finally:
        svc.load_config({})
