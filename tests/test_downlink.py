"""Commands and desired state down to sites that are offline, with real brokers, real
processes and real faults (docs/commands.md, docs/shadow.md). Each test prints what it
counted: sent, executed, and the final states."""

from __future__ import annotations

import json
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
    import os
    import signal
    from edge import Service

    svc = Service("target", heartbeat=0)
    RUNS = os.environ["RUNS_FILE"]

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
    st = CloudState(pipe.sink_path)
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


def test_command_online_round_trip(pipe, proc_factory):
    pipe.start()
    start_target(pipe, proc_factory)
    cid = send(pipe, {"interval": 2})
    row = wait_state(pipe, cid, "succeeded")
    report("online", 1, runs(pipe), [row["state"]])
    assert row["reply"] == {"interval": 2.0}
    assert runs(pipe) == ["2.0"]
    assert row["delivered_at"] and row["accepted_at"] and row["finished_at"]


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
