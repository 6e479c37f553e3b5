"""The downlink's rules without brokers: time to live on an injected clock (a wall-clock
jump of a year neither expires nor revives a command), state and version rules of the
cloud database and the gateway's downlink store, the delta."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.downlink import Clock, Held, delta, parse_target_command
from gateway.cloudstate import CloudState, VersionConflict
from gateway.downstore import DownStore

YEAR = 365 * 86400.0


class FakeClock(Clock):
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall_t = 1.7e9
        self.boot_id = "boot-1"
        self.synced = True

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.wall_t

    def boot(self) -> str:
        return self.boot_id

    def wall_synced(self) -> bool:
        return self.synced


def test_wall_clock_jump_neither_expires_nor_revives() -> None:
    c = FakeClock()
    h = Held.start(10_000, c)
    c.wall_t += YEAR  # NTP fixes a clock that was a year behind
    left, _ = h.remaining(c)
    assert left == 10_000
    c.mono += 9.5
    c.wall_t -= 2 * YEAR  # and back again, by two years
    assert 0 < h.remaining(c)[0] <= 500
    c.mono += 1.0
    left, why = h.remaining(c)
    assert left <= 0 and "ran out" in why
    c.wall_t -= YEAR  # going back in wall time does not revive it
    assert h.remaining(c)[0] <= 0
    print("[wall clock +-1y] expired_early=0 revived=0", flush=True)


def test_restart_of_the_host_counts_downtime_conservatively() -> None:
    c = FakeClock()
    h = Held.start(60_000, c)
    c.boot_id, c.mono = "boot-2", 5.0  # rebooted: the monotonic clock started over
    c.wall_t += 20
    assert h.remaining(c)[0] == pytest.approx(40_000)
    c.synced = False  # a Pi without RTC: the wall clock cannot be trusted
    left, why = h.remaining(c)
    assert left <= 0 and "cannot be measured" in why
    c.synced, c.wall_t = True, h.saved_wall - YEAR  # synced but behind the save: unknown
    assert h.remaining(c)[0] <= 0


def test_target_counts_from_the_gateways_publish_on_the_same_boot() -> None:
    c = FakeClock()
    data = {"name": "x", "args": {}, "ttl_ms": 5000, "mono": c.mono, "boot": c.boot_id}
    c.mono += 6  # queued at the local broker for 6 s
    cmd = parse_target_command("id1", data, "x", c)
    assert cmd.held.remaining(c)[0] <= 0
    other = dict(data, boot="another-host")
    assert parse_target_command("id1", other, "x", c).held.remaining(c)[0] == 5000


def test_downstore_rebase_keeps_the_deadline_across_a_wall_jump(tmp_path: Path) -> None:
    c = FakeClock()
    st = DownStore(tmp_path / "s.downlink", c)
    st.open()
    assert st.receive([{"id": "a", "target": "t", "name": "n", "args": {}, "ttl_ms": 10_000},
                       {"id": "b", "target": "t", "name": "n", "args": {}, "ttl_ms": None}], []) == (2, 0)
    assert st.receive([{"id": "a", "target": "t", "name": "n", "args": {}, "ttl_ms": 99_000}], []) == (0, 0)
    c.wall_t += YEAR
    c.mono += 5
    assert st.rebase() == 0  # a gateway restart on the same boot
    st.close()
    st = DownStore(tmp_path / "s.downlink", c)
    st.open()
    held = {x.id: x for x in st.open_commands()}
    assert held["a"].held.remaining(c)[0] == pytest.approx(5000)
    c.mono += 6
    assert st.rebase() == 1
    c.wall_t -= 3 * YEAR
    states = {x.id: x.state for x in st.open_commands()}
    assert states == {"a": "expired", "b": "held"}
    st.close()


def test_downstore_drops_older_desired_never_merges(tmp_path: Path) -> None:
    st = DownStore(tmp_path / "s.downlink", FakeClock())
    st.open()
    assert st.receive([], [{"thing": "d", "version": 3, "desired": {"a": 1, "b": 2}}]) == (0, 1)
    assert st.receive([], [{"thing": "d", "version": 2, "desired": {"a": 9, "c": 3}}]) == (0, 0)
    assert st.receive([], [{"thing": "d", "version": 4, "desired": {"c": 3}}]) == (0, 1)
    (t,) = st.things()
    assert (t.desired, t.desired_version) == ({"c": 3}, 4)
    assert st.report("d", {"c": 1}) == 1 and st.report("d", {"c": 1}) is None
    (t,) = st.things()
    assert t.delta == {"c": 3}
    st.close()


def test_cloudstate_rules(tmp_path: Path) -> None:
    cs = CloudState(tmp_path / "cloud.db")
    cid = cs.add_command("n1", "t", "x", {}, 60, now=100.0)
    assert not cs.apply_status("n2", {"id": cid, "status": "succeeded"})  # another node's
    assert cs.apply_status("n1", {"id": cid, "status": "accepted", "by": "t"}, now=101)
    assert not cs.apply_status("n1", {"id": cid, "status": "delivered", "by": "gateway"})
    assert cs.apply_status("n1", {"id": cid, "status": "succeeded", "reply": 5, "by": "t"})
    assert not cs.apply_status("n1", {"id": cid, "status": "failed", "by": "t"})  # final stays
    row = cs.command(cid)
    assert row is not None and (row["state"], row["reply"]) == ("succeeded", 5)
    # the cloud's expiry gives way to the site, which took it just in time
    late = cs.add_command("n1", "t", "x", {}, 1, now=100.0)
    assert cs.offers_for("n1", set(), now=102.0) == []
    assert cs.command(late)["state"] == "expired"  # type: ignore[index]
    assert cs.apply_status("n1", {"id": late, "status": "succeeded", "by": "t"})
    # shadows: versions grow by one; a stale version is a conflict
    assert cs.set_desired("n1", "d", {"a": 1}) == 1
    assert cs.set_desired("n1", "d", {"a": 2}, expect=1) == 2
    with pytest.raises(VersionConflict):
        cs.set_desired("n1", "d", {"a": 3}, expect=1)
    assert cs.apply_reported("n1", {"thing": "d", "epoch": 5, "version": 2, "reported": {"a": 2}})
    assert not cs.apply_reported("n1", {"thing": "d", "epoch": 5, "version": 1, "reported": {"a": 0}})
    assert cs.apply_reported("n1", {"thing": "d", "epoch": 6, "version": 1, "reported": {"a": 1}})
    sh = cs.shadow("n1", "d")
    assert sh is not None and sh["reported"] == {"a": 1} and sh["stale_dropped"] == 1
    cs.close()


def test_delta() -> None:
    assert delta({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 2, "d": 4}, "x": 0}) == {"b": {"d": 3}}
    assert delta({"a": 1}, None) == {"a": 1}
    assert delta(None, {"a": 1}) == {}
