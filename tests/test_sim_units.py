"""Simulator parts in memory: sensors, fault plan, outbox, profile, payloads, verify."""

from __future__ import annotations

import statistics
from pathlib import Path

import orjson
import pytest

from firmware_sim import (
    Outbox,
    ProfileError,
    Sensors,
    compare,
    load_profile,
    parse_fault_flag,
    plan_faults,
)
from firmware_sim.faults import garbage_payload
from firmware_sim.outbox import Entry, SeqRanges

REPO = Path(__file__).resolve().parent.parent


def _series(
    seed: int, dev: int, ticks: int, interval: float, streams: tuple[str, ...],
    on: tuple[str, ...] | None = None,
) -> list[tuple]:
    s = Sensors(seed, dev) if on is None else Sensors(seed, dev, streams=on)
    out = []
    for k in range(ticks):
        s.advance(k, k * interval, interval)
        out.append(tuple(orjson.dumps(s.read(name)) for name in streams))
    return out


STREAMS = ("temperature", "humidity", "pressure", "vibration", "door", "battery")


def test_sensor_values_are_a_function_of_the_seed() -> None:
    a = _series(7, 3, 300, 1.0, STREAMS)
    b = _series(7, 3, 300, 1.0, STREAMS)
    c = _series(8, 3, 300, 1.0, STREAMS)
    d = _series(7, 4, 300, 1.0, STREAMS)
    assert a == b
    assert a != c and a != d


def test_a_stream_reads_the_same_whichever_others_are_on() -> None:
    """A device advances only the state its streams read: each stream's values are those
    of a device with all six on."""
    full = _series(5, 2, 400, 1.0, STREAMS)
    for i, name in enumerate(STREAMS):
        alone = _series(5, 2, 400, 1.0, (name,), on=(name,))
        assert [row[i] for row in full] == [row[0] for row in alone], name
    pair = _series(5, 2, 400, 1.0, ("door", "battery"), on=("door", "battery"))
    assert [row[4:] for row in full] == pair


def test_sensor_signals_are_believable() -> None:
    # one reading every 10 minutes for two days
    s = Sensors(1, 0)
    temps, hums, pres, vib, doors, batt = [], [], [], [], [], []
    for k in range(288):
        s.advance(k, k * 600.0, 600.0)
        temps.append(s.read("temperature")["value"])  # type: ignore[index]
        hums.append(s.read("humidity")["value"])  # type: ignore[index]
        pres.append(s.read("pressure")["value"])  # type: ignore[index]
        vib.append(s.read("vibration"))
        doors.append(s.read("door"))
        batt.append(s.read("battery")["percent"])  # type: ignore[index]
    assert 5 < min(temps) and max(temps) < 35
    assert max(temps) - min(temps) > 6, "a daily cycle of several degrees"
    assert statistics.correlation(temps, hums) < -0.8, "humidity falls as temperature rises"
    assert 980 < min(pres) and max(pres) < 1045 and max(pres) - min(pres) < 15
    bursts = [v for v in vib if v["burst"]]  # type: ignore[index]
    quiet = [v for v in vib if not v["burst"]]  # type: ignore[index]
    assert bursts and len(quiet) > 3 * len(bursts)
    assert min(v["rms"] for v in bursts) > max(v["rms"] for v in quiet)  # type: ignore[index]
    events = [d for d in doors if d is not None]
    assert 3 < len(events) < 200, "the door reports changes only"
    assert all(e["open"] != f["open"] for e, f in zip(events, events[1:], strict=False))  # type: ignore[index]
    assert all(x >= y for x, y in zip(batt, batt[1:], strict=False)) and batt[0] > batt[-1]


def test_battery_drains_faster_with_a_shorter_interval() -> None:
    def left_after_an_hour(interval: float) -> float:
        s = Sensors(2, 0)
        start = s.battery
        for k in range(int(3600 / interval)):
            s.advance(k, k * interval, interval)
            s.sent(5)
        return start - s.battery

    assert left_after_an_hour(1.0) > 5 * left_after_an_hour(10.0)


def test_fault_plan_is_fixed_by_the_seed() -> None:
    faults = {
        "drop": {"devices": 0.2, "at": [5, 10], "down": [1, 2], "count": 2},
        "flap": {"devices": 0.1, "at": [1, 2], "duration": 6, "up": [0.5, 1], "down": [0.2, 0.4]},
        "die": {"devices": 0.05, "at": [3, 4], "down": [1, 1]},
        "garbage": {"devices": 0.5, "probability": 0.1},
        "clock_skew": {"devices": 0.3},
        "storm": {"only": ["dev-0003"], "at": 2},
    }
    p1 = load_profile(None, devices=40, seed=5, faults=faults)
    p2 = load_profile(None, devices=40, seed=5, faults=faults)
    p3 = load_profile(None, devices=40, seed=6, faults=faults)
    plan1, plan2, plan3 = plan_faults(p1), plan_faults(p2), plan_faults(p3)
    as_json = lambda plan: {k: v.to_json() for k, v in plan.items()}  # noqa: E731
    assert as_json(plan1) == as_json(plan2)
    assert as_json(plan1) != as_json(plan3)
    drops = [n for n, d in plan1.items() if sum(1 for t in d.timed if t[1] == "drop") >= 2]
    assert len(drops) >= 8  # 20% of 40 drop twice, plus flappers
    assert sum(1 for d in plan1.values() if d.garbage) == 20
    assert sum(1 for d in plan1.values() if any(t[1] == "die" for t in d.timed)) == 2
    assert [t for t in plan1["dev-0003"].timed if t[1] == "storm"][0][0] == 2.0
    for d in plan1.values():
        for at, kind, arg in d.timed:
            if kind == "drop" and arg < 1:  # a flap: inside its window
                assert 1 <= at < 8
    skews = [d.skew for d in plan1.values() if d.skew]
    assert len(skews) == 12 and all(-300 <= s <= 300 for s in skews)


def test_outbox_keeps_the_newest_and_counts_what_it_drops() -> None:
    box = Outbox(3)
    for seq in range(1, 8):
        box.put(Entry("dt/d/t", b"%d" % seq, "t", seq))
    assert len(box) == 3 and box.dropped == 4
    assert box.drop_reasons == {"outbox_full": 4}
    assert box.dropped_seqs["t"].to_json() == [[1, 4]]
    sent = [box.next_unsent() for _ in range(3)]
    assert [e.seq for _, e in sent] == [5, 6, 7]  # type: ignore[union-attr]
    assert box.next_unsent() is None
    box.ack(sent[0][0])  # type: ignore[index]
    box.requeue_all()  # the link died with 6 and 7 in flight: they go again
    again = [box.next_unsent(), box.next_unsent(), box.next_unsent()]
    assert [e.seq for _, e in again[:2]] == [6, 7] and again[2] is None  # type: ignore[union-attr,index]
    assert box.clear("power_loss") == 2
    assert box.drop_reasons == {"outbox_full": 4, "power_loss": 2}
    assert box.dropped_seqs["t"].to_json() == [[1, 4], [6, 7]]
    with pytest.raises(ValueError):
        Outbox(0)


def test_seq_ranges_merge() -> None:
    r = SeqRanges()
    for n in (5, 1, 2, 3, 9, 4, 10, 4):
        r.add(n)
    assert r.to_json() == [[1, 5], [9, 10]] and len(r) == 7 and 9 in r and 7 not in r


def test_profile_from_yaml_flags_and_errors(tmp_path: Path) -> None:
    example = load_profile(REPO / "deploy/sim/profile-example.yaml")
    assert example.devices >= 1 and example.faults.drop is not None
    f = tmp_path / "p.yaml"
    f.write_text(
        "devices: 3\ninterval: 0.5\nsensors: [temperature, {name: battery, every: 10}]\n"
        "faults:\n  garbage: {probability: 0.2}\n"
    )
    p = load_profile(
        f, devices=5, faults=dict([parse_fault_flag("die:devices=0.5,at=1..2,down=never")])
    )
    assert p.devices == 5 and p.interval == 0.5
    assert [(s.name, s.every) for s in p.sensors] == [("temperature", 1), ("battery", 10)]
    assert p.faults.garbage is not None and p.faults.garbage.probability == 0.2
    assert p.faults.die is not None and p.faults.die.at == (1.0, 2.0) and p.faults.die.down is None
    assert p.target_rate() == pytest.approx(5 * 1.1 / 0.5)
    assert parse_fault_flag("drop:only=dev-0001+dev-0002") == (
        "drop",
        {"only": ["dev-0001", "dev-0002"]},
    )
    for bad, needle in [
        ("interval: 0\n", "interval"),
        ("devices: [1]\n", "devices"),
        ("faults: {melt: {}}\n", "melt"),
        ("sensors: [smell]\n", "sensors"),
        ("faults: {drop: {at: [9, 1]}}\n", "upper end"),
        (": :\n", "not valid YAML"),
    ]:
        f.write_text(bad)
        with pytest.raises(ProfileError) as e:
            load_profile(f)
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ProfileError, match="unknown kind"):
        parse_fault_flag("meteor:devices=1")
    with pytest.raises(ProfileError, match="not key=value"):
        parse_fault_flag("drop:devices")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "missing.yaml")


def test_garbage_payloads_are_not_readable_events() -> None:
    good = orjson.dumps({"specversion": "1.0", "id": "x", "data": {"seq": 1, "value": 2.0}})
    kinds = {garbage_payload(good, 1, 2, 3, n)[:4] for n in range(200)}
    assert len(kinds) == 4
    for n in range(50):
        bad = garbage_payload(good, 9, n)
        try:
            ev = orjson.loads(bad)
        except orjson.JSONDecodeError:
            continue
        assert not (
            isinstance(ev, dict)
            and isinstance(ev.get("data"), dict)
            and isinstance(ev["data"].get("seq"), int)
        )


def _manifest(run: str = "r1") -> dict:
    return {
        "format": "edgeferry-sim-manifest",
        "version": 1,
        "run": run,
        "devices": {
            "dev-a": {
                "streams": {
                    "t": {"first": 1, "last": 10, "dropped": [[3, 4]]},
                    "door": {"first": 0, "last": 0, "dropped": []},
                },
                "duplicates_sent": 1,
                "garbage_sent": 1,
            },
            "dev-b": {"streams": {"t": {"first": 1, "last": 5, "dropped": []}}},
        },
    }


def _row(device: str, stream: str, seq: int, run: str = "r1") -> dict:
    ev = {
        "specversion": "1.0",
        "id": f"{device}{seq}",
        "source": f"/s/devices/{device}",
        "type": "io.edgeferry.telemetry.t",
        "simrun": run,
        "data": {"seq": seq},
    }
    return {"topic": f"dt/{device}/{stream}", "payload": orjson.dumps(ev).decode()}


def test_verify_counts_sent_delivered_dropped_lost_duplicated() -> None:
    rows = [
        _row("dev-a", "t", n) for n in (1, 2, 4, 5, 6, 7, 8, 9, 10)
    ]  # 3 dropped, 4 dropped but arrived
    rows.append(_row("dev-a", "t", 5))  # a duplicate
    rows.append({"topic": "dt/dev-a/t", "payload": '{"spec'})  # garbage
    rows.append({"topic": "dt/dev-a/t", "payload": "/w==", "encoding": "base64"})  # garbage too
    rows += [_row("dev-b", "t", n) for n in (1, 2, 5)]  # 3 and 4 lost
    rows.append(_row("dev-b", "t", 3, run="other"))  # another run: not ours
    rows.append({"topic": "evt/cmd/dev-a", "payload": "{}"})
    r = compare(_manifest(), rows)
    a, b = r.devices
    assert (
        a.sent,
        a.delivered,
        a.dropped,
        a.dropped_delivered,
        a.lost,
        a.duplicated,
        a.garbage,
    ) == (
        10,
        9,
        2,
        1,
        0,
        1,
        2,
    )
    assert (b.sent, b.delivered, b.lost, b.lost_ranges) == (5, 3, 2, {"t": [[3, 4]]})
    assert r.total.lost == 2 and not r.ok and r.foreign == 2
    rows += [_row("dev-b", "t", 3), _row("dev-b", "t", 4)]
    assert compare(_manifest(), rows).ok
