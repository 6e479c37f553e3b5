"""Commands and desired state down to sites that are offline, with real brokers, real
processes and real faults (docs/commands.md, docs/shadow.md). Each test prints what it
counted: sent, executed, and the final states."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from gateway.cloudstate import CloudState
from tests.harness import wait_until
from tests.pipeline import Pipeline

pytestmark = pytest.mark.timeout(120)

PY = sys.executable

TARGET = textwrap.dedent("""
    import json
    import os
    import signal
    from edge import Service

    svc = Service("target", heartbeat=0)
    RUNS = os.environ["RUNS_FILE"]

    @svc.on_desired("target")
    async def on_desired(doc: dict) -> None:
        print(f"desired {json.dumps(doc)}", flush=True)
        await svc.report("target", {"interval": doc.get("interval")})

    @svc.command("set_interval")
    async def set_interval(interval: float, die: bool = False) -> dict:
        with open(RUNS, "a") as f:
            f.write(f"{interval}\\n")
        print(f"ran set_interval {interval}", flush=True)
        if die:
            os.kill(os.getpid(), signal.SIGKILL)  # after executing, before replying
        return {"interval": interval}
""")


@pytest.fixture
def pipe(tmp_path, broker_factory, proc_factory, chaos):
    return Pipeline(tmp_path, broker_factory, proc_factory, chaos, node="site-1",
                    gateway_args=("--redeliver", "1s"), sink="sqlite")


@pytest.fixture(params=["sqlite", "jsonl"])
def any_sink_pipe(request, tmp_path, broker_factory, proc_factory, chaos):
    return Pipeline(tmp_path, broker_factory, proc_factory, chaos, node="site-1",
                    gateway_args=("--redeliver", "1s"), sink=request.param)


def start_target(pipe: Pipeline, proc_factory: Any, name: str = "target") -> Any:
    (pipe.tmp / "target_mod.py").write_text(TARGET)
    p = proc_factory([PY, "-m", "edgeferry", "service", "run", "target_mod:svc", "--broker", pipe.edge.url,
                      "--state-dir", str(pipe.tmp / "state"), "--log-level", "INFO"], name,
                     env={"RUNS_FILE": str(pipe.tmp / "runs.txt")}, cwd=pipe.tmp)
    p.wait_for_line(r"service target ready", 20)
    return p


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([PY, "-m", "edgeferry", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"edgeferry {' '.join(args)} -> {r.returncode}: {r.stderr}")
    return r


def send(pipe: Pipeline, args: dict[str, Any], ttl: str = "1h", cloud: bool = True) -> str:
    extra = ["--cloud", pipe.cloud.url] if cloud else []
    r = cli("cmd", "send", *extra, "--sink", pipe.sink, "--node", pipe.node, "--target", "target",
            "--name", "set_interval", "--args", json.dumps(args), "--ttl", ttl)
    return r.stdout.strip()


def command(pipe: Pipeline, cid: str) -> dict[str, Any]:
    st = CloudState.for_sink(pipe.sink)
    try:
        row = st.command(cid)
    finally:
        st.close()
    assert row is not None
    return row


def wait_state(pipe: Pipeline, cid: str, state: str, timeout: float = 30) -> dict[str, Any]:
    wait_until(lambda: command(pipe, cid)["state"] == state, timeout, f"command {cid} {state}")
    return command(pipe, cid)


def runs(pipe: Pipeline) -> list[str]:
    p = pipe.tmp / "runs.txt"
    return p.read_text().split() if p.exists() else []


def report(label: str, sent: int, executed: list[str], states: list[str]) -> None:
    print(f"[{label}] sent={sent} executed={len(executed)} states={','.join(states)}", flush=True)


def test_command_online_round_trip(any_sink_pipe, proc_factory):
    pipe = any_sink_pipe
    pipe.start()
    start_target(pipe, proc_factory)
    cid = send(pipe, {"interval": 2})
    row = wait_state(pipe, cid, "succeeded")
    report("online", 1, runs(pipe), [row["state"]])
    assert row["reply"] == {"interval": 2.0}
    assert runs(pipe) == ["2.0"]
    assert row["delivered_at"] and row["accepted_at"] and row["finished_at"]
    from gateway.health import render_metrics

    st = pipe.status()
    down = st["downlink"]
    assert (down["cloud"], down["local"], down["counters"]["commands_received"]) == ("up", "up", 1)
    assert 'edgeferry_downlink_up{node="site-1",link="cloud"} 1' in render_metrics(st)
    listed = json.loads(cli("cmd", "list", "--sink", pipe.sink, "--node", pipe.node, "--json").stdout)
    assert [(r["id"], r["state"]) for r in listed] == [(cid, "succeeded")]


def test_status_fast_path_does_not_wait_for_the_group_commit(tmp_path, broker_factory, proc_factory, chaos):
    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos, node="site-1",
                    gateway_args=("--commit-interval", "60s"), sink="sqlite")
    pipe.start()
    start_target(pipe, proc_factory)
    cid = send(pipe, {"interval": 8})
    row = wait_state(pipe, cid, "succeeded", 15)  # the events lane would wait up to 60 s
    report("fast path", 1, runs(pipe), [row["state"]])
    assert row["reply"] == {"interval": 8.0} and pipe.status()["downlink"]["counters"]["statuses_fast"] >= 2


def test_unknown_target_is_rejected(pipe, proc_factory):
    pipe.start()
    start_target(pipe, proc_factory)
    r = cli("cmd", "send", "--cloud", pipe.cloud.url, "--sink", pipe.sink, "--node", pipe.node,
            "--target", "nobody", "--name", "set_interval", "--args", "{}")
    cid = r.stdout.strip()
    row = wait_state(pipe, cid, "rejected")
    report("unknown target", 1, runs(pipe), [row["state"]])
    assert "unknown target" in row["error"] and runs(pipe) == []


def test_queued_while_offline_runs_once_on_return(pipe, proc_factory):
    pipe.start()
    start_target(pipe, proc_factory)
    pipe.proxy.cut()
    pipe.gateway.wait_for_line(r"cloud link \(downlink\) lost", 20)
    cid = send(pipe, {"interval": 5})  # published to a cloud broker the site is not on
    assert command(pipe, cid)["state"] == "queued"
    pipe.proxy.up()
    row = wait_state(pipe, cid, "succeeded")
    report("offline-then-online", 1, runs(pipe), [row["state"]])
    assert runs(pipe) == ["5.0"]


def test_ttl_shorter_than_outage_expires_never_runs(pipe, proc_factory):
    pipe.start()
    start_target(pipe, proc_factory)
    pipe.proxy.cut()
    pipe.gateway.wait_for_line(r"cloud link \(downlink\) lost", 20)
    cid = send(pipe, {"interval": 7}, ttl="1s")
    wait_until(lambda: cli("cmd", "status", "--sink", pipe.sink, cid, "--json").stdout.count('"expired"') > 0,
               10, "cmd status reports expired")
    mark = pipe.ingest.mark()
    pipe.proxy.up()
    # the site reconnects and says hello; nothing is offered, nothing runs
    pipe.ingest.wait_for_line(r"answered hello of site-1: 0 commands", 20, since=mark)
    row = command(pipe, cid)
    report("ttl-expired", 1, runs(pipe), [row["state"]])
    assert row["state"] == "expired"
    assert runs(pipe) == []


def shadow(pipe: Pipeline) -> dict[str, Any] | None:
    st = CloudState(pipe.sink_path)
    try:
        return st.shadow(pipe.node, "target")
    finally:
        st.close()


def set_desired(pipe: Pipeline, doc: dict[str, Any], version: int | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    extra = [] if version is None else ["--version", str(version)]
    return cli("shadow", "set", "--cloud", pipe.cloud.url, "--sink", pipe.sink, "--node", pipe.node,
               "--thing", "target", "--desired", json.dumps(doc), *extra, check=check)


def watch_desired(pipe: Pipeline, proc_factory: Any, name: str, count: int = 0) -> Any:
    args = ["mosquitto_sub", "-h", pipe.edge.host, "-p", str(pipe.edge.port), "-q", "1",
            "-t", "shadow/target/desired", "-F", "%r %p"]
    if count:
        args += ["-C", str(count)]
    return proc_factory(args, name)


def versions_seen(watcher: Any) -> list[int]:
    out = []
    for line in watcher.lines:
        _, _, payload = line.partition(" ")
        try:
            out.append(json.loads(payload)["version"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def test_gateway_kill9_between_receiving_and_delivering_runs_once(pipe, proc_factory):
    pipe.start_ingest()
    pipe.start_gateway(failpoint="downlink_crash_after_receive")
    start_target(pipe, proc_factory)
    pipe.gateway.wait_for_line(r"cloud broker .* connected", 20)
    cid = send(pipe, {"interval": 3})
    pipe.gateway.wait_for_line(r"failpoint downlink_crash_after_receive", 20)
    assert pipe.gateway.wait(10) == -9
    assert runs(pipe) == []
    pipe.start_gateway()
    row = wait_state(pipe, cid, "succeeded")
    report("gateway kill -9 after receive", 1, runs(pipe), [row["state"]])
    assert runs(pipe) == ["3.0"]


def test_target_killed_after_executing_is_not_run_again(pipe, proc_factory):
    pipe.start()
    target = start_target(pipe, proc_factory)
    cid = send(pipe, {"interval": 4, "die": True})
    target.wait_for_line(r"ran set_interval 4", 20)
    assert target.wait(10) == -9
    start_target(pipe, proc_factory, "target2")  # the gateway delivers it again
    row = wait_state(pipe, cid, "failed")
    report("target kill -9 after executing", 1, runs(pipe), [row["state"]])
    assert runs(pipe) == ["4.0"]
    assert "interrupted" in row["error"]


def test_cloud_broker_restarted_without_persistence_while_site_away(pipe, proc_factory):
    # statuses by the events lane only here: the reliable path, without the fast one
    pipe.start_ingest()
    pipe.start_gateway(failpoint="downlink_no_fast_status")
    pipe.gateway.wait_for_line(r"cloud broker .* connected", 20)
    start_target(pipe, proc_factory)
    pipe.proxy.cut()
    pipe.gateway.wait_for_line(r"cloud link \(downlink\) lost", 20)
    cid = send(pipe, {"interval": 6})
    assert set_desired(pipe, {"interval": 6}).stdout.strip() == "1"
    pipe.cloud.kill()
    shutil.rmtree(pipe.cloud.data_dir)  # sessions, queues and retained messages are gone
    pipe.cloud.data_dir.mkdir()
    pipe.cloud.start()
    pipe.proxy.up()
    row = wait_state(pipe, cid, "succeeded")
    wait_until(lambda: (shadow(pipe) or {}).get("reported") == {"interval": 6}, 30, "reported interval 6")
    sh = shadow(pipe)
    report("cloud broker wiped", 1, runs(pipe), [row["state"], f"reported_v{sh['reported_version']}"])
    assert runs(pipe) == ["6.0"]
    assert sh["desired_version"] == 1


def test_desired_changed_three_times_offline_ends_at_the_last(pipe, proc_factory):
    pipe.start()
    target = start_target(pipe, proc_factory)
    watcher = watch_desired(pipe, proc_factory, "watch")
    assert set_desired(pipe, {"interval": 1}).stdout.strip() == "1"
    target.wait_for_line(r'desired \{"interval": 1\}', 20)
    pipe.proxy.cut()
    pipe.gateway.wait_for_line(r"cloud link \(downlink\) lost", 20)
    for v, interval in ((2, 10), (3, 20), (4, 30)):
        assert set_desired(pipe, {"interval": interval}, version=v - 1).stdout.strip() == str(v)
    # a stale set is refused like AWS's 409
    stale = set_desired(pipe, {"interval": 99}, version=2, check=False)
    assert stale.returncode == 3 and "version conflict" in stale.stderr
    # a device rebooted during the outage gets the desired state from the local broker
    rebooted = watch_desired(pipe, proc_factory, "rebooted", count=1)
    rebooted.wait(10)
    assert versions_seen(rebooted) == [1]
    pipe.proxy.up()
    target.wait_for_line(r'desired \{"interval": 30\}', 30)
    wait_until(lambda: (shadow(pipe) or {}).get("reported") == {"interval": 30}, 30, "reported interval 30")
    seen = versions_seen(watcher)
    print(f"[desired x3 offline] set=4 seen_by_device={seen} refused_stale=1", flush=True)
    assert seen[-1] == 4 and seen == sorted(seen)
    sh = json.loads(cli("shadow", "get", "--sink", pipe.sink, "--node", pipe.node, "--thing", "target",
                        "--json").stdout)
    assert (sh["desired"], sh["desired_version"], sh["delta"]) == ({"interval": 30}, 4, {})
    assert sh["reported"] == {"interval": 30} and sh["reported_version"] >= 2


def test_simulated_devices_follow_commands_and_desired_interval(pipe, proc_factory):
    pipe.start()
    fleet = proc_factory([PY, "-m", "edgeferry", "sim", "run", "--broker", pipe.edge.url, "--devices", "2",
                          "--interval", "1", "--seed", "3"], "fleet")
    born = proc_factory(["mosquitto_sub", "-h", pipe.edge.host, "-p", str(pipe.edge.port), "-C", "2",
                         "-t", "state/dev-0000", "-t", "state/dev-0001"], "births")
    born.wait(20)  # both devices announced themselves (retained births)
    st = CloudState(pipe.sink_path)
    try:
        st.set_desired(pipe.node, "dev-0000", {"interval": 0.5})
    finally:
        st.close()
    # no --cloud: stored only; ingest's sync offers it to the online site within 5 s
    r = cli("cmd", "send", "--sink", pipe.sink, "--node", pipe.node, "--target", "dev-0001",
            "--name", "set_interval", "--args", '{"interval": 2}')
    cid = r.stdout.strip()
    row = wait_state(pipe, cid, "succeeded", 30)

    def reported() -> Any:
        st = CloudState(pipe.sink_path)
        try:
            return (st.shadow(pipe.node, "dev-0000") or {}).get("reported")
        finally:
            st.close()

    wait_until(lambda: reported() == {"interval": 0.5}, 30, "dev-0000 reported interval 0.5")
    print(f"[sim devices] commands=1 state={row['state']} reply={row['reply']} "
          f"desired_reported={reported()}", flush=True)
    assert row["reply"] == {"interval": 2.0} and row["by"] == "dev-0001"
    fleet.terminate(10)


def test_offline_target_gets_one_copy_not_one_per_redelivery(tmp_path, broker_factory, proc_factory, chaos):
    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos, node="site-1",
                    gateway_args=("--redeliver", "0.2s"), sink="sqlite")
    pipe.start()
    start_target(pipe, proc_factory).terminate(10)  # a clean stop: state/target is "offline"
    cid = send(pipe, {"interval": 9})
    wait_state(pipe, cid, "delivered")
    start_target(pipe, proc_factory, "target2")  # its session held the one copy
    row = wait_state(pipe, cid, "succeeded")
    published = pipe.status()["downlink"]["counters"]["commands_published"]
    print(f"[offline target] sent=1 executed={len(runs(pipe))} published={published} state={row['state']}",
          flush=True)
    assert runs(pipe) == ["9.0"]
    assert published <= 2  # once while it was offline, at most once more when it came back


def test_commands_and_desired_state_through_nats(tmp_path, broker_factory, proc_factory, chaos):
    from tests.cloud_brokers import NatsBroker, nats_missing

    why = nats_missing()
    if why:
        pytest.skip(why)
    nats = NatsBroker(tmp_path / "nats").start()
    try:
        pipe = Pipeline(tmp_path, lambda conf: nats if conf == "cloud" else broker_factory(conf),
                        proc_factory, chaos, node="site-1", sink="sqlite",
                        gateway_args=("--cloud-profile", "nats", "--redeliver", "1s"))
        pipe.start()
        start_target(pipe, proc_factory)
        pipe.proxy.cut()
        pipe.gateway.wait_for_line(r"cloud link \(downlink\) lost", 20)
        cid = send(pipe, {"interval": 11})
        set_desired(pipe, {"interval": 11})
        pipe.proxy.up()
        row = wait_state(pipe, cid, "succeeded", 60)
        wait_until(lambda: (shadow(pipe) or {}).get("reported") == {"interval": 11}, 60, "reported interval 11")
        report("nats", 1, runs(pipe), [row["state"]])
        assert runs(pipe) == ["11.0"]
    finally:
        nats.stop()
