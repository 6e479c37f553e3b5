"""``edgeferry sim``: help with examples, one-line errors with non-zero exits."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeferry.cli import app
from firmware_sim import ResourceLimitError, raise_open_file_limit
from tests.harness import Broker, free_port

runner = CliRunner()


@pytest.mark.parametrize("args", [["sim"], ["sim", "run"], ["sim", "verify"], ["sim", "plan"]])
def test_every_sim_command_has_help_with_an_example(args: list[str]) -> None:
    r = runner.invoke(app, [*args, "--help"])
    assert r.exit_code == 0, r.output
    if len(args) > 1:
        assert "Example: edgeferry sim " + args[1] in " ".join(r.output.split())


def _err(args: list[str]) -> tuple[int, str]:
    r = runner.invoke(app, args)
    return r.exit_code, r.output.strip()


def test_sim_errors_are_one_line_and_non_zero(tmp_path: Path) -> None:
    closed = f"mqtt://127.0.0.1:{free_port()}"
    cases = [
        (["sim", "run", "--broker", "localhost:99"], 2, "not of the form mqtt://"),
        (["sim", "run", "--broker", closed, "--fault", "meteor"], 2, "unknown kind 'meteor'"),
        (["sim", "run", "--broker", closed, "--interval", "-1"], 2, "interval"),
        (
            ["sim", "run", "--broker", closed, "--profile", str(tmp_path / "nope.yaml")],
            2,
            "cannot read profile",
        ),
        (["sim", "run", "--broker", closed, "--chaos", "soon"], 2, "must look like"),
        (["sim", "run", "--broker", closed, "--procs", "two"], 2, "expected a number or auto"),
        (["sim", "run", "--broker", closed, "--procs", "0"], 2, "expected at least 1"),
        (["sim", "run", "--broker", closed, "--connect-rate", "0"], 2, "connect_rate"),
        (
            ["sim", "run", "--broker", closed, "--devices", "2", "--duration", "1"],
            1,
            "cannot reach the broker",
        ),
        (
            ["sim", "run", "--broker", closed, "--manifest", str(tmp_path / "no/such/dir/m.json")],
            1,
            "not a writable directory",
        ),
        (
            ["sim", "verify", "--manifest", str(tmp_path / "m.json"), "--sink", "jsonl:x"],
            2,
            "cannot read manifest",
        ),
    ]
    for args, code, needle in cases:
        rc, out = _err(args)
        assert rc == code and needle in out and len(out.splitlines()) == 1, (args, rc, out)
        assert out.startswith("error:"), out
    (tmp_path / "m.json").write_text(json.dumps({"hello": 1}))
    rc, out = _err(["sim", "verify", "--manifest", str(tmp_path / "m.json"), "--sink", "jsonl:x"])
    assert rc == 2 and "not an edgeferry simulator manifest" in out
    good = {"format": "edgeferry-sim-manifest", "version": 1, "run": "r", "devices": {}}
    (tmp_path / "m.json").write_text(json.dumps(good))
    rc, out = _err(["sim", "verify", "--manifest", str(tmp_path / "m.json"), "--sink", "csv:x"])
    assert rc == 2 and "jsonl:PATH or sqlite:PATH" in out
    rc, out = _err(
        [
            "sim",
            "verify",
            "--manifest",
            str(tmp_path / "m.json"),
            "--sink",
            f"jsonl:{tmp_path / 'none.jsonl'}",
        ]
    )
    assert rc == 2 and "does not exist" in out
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    (tmp_path / "bad.db").write_text("not a database, just text " * 100)
    for bad in (f"jsonl:{tmp_path / 'bad.jsonl'}", f"sqlite:{tmp_path / 'bad.db'}"):
        rc, out = _err(["sim", "verify", "--manifest", str(tmp_path / "m.json"), "--sink", bad])
        assert rc == 2 and "cannot read sink" in out and len(out.splitlines()) == 1, out
    (tmp_path / "empty.jsonl").write_text("")
    rc, out = _err(
        [
            "sim",
            "verify",
            "--manifest",
            str(tmp_path / "m.json"),
            "--sink",
            f"jsonl:{tmp_path / 'empty.jsonl'}",
        ]
    )
    assert rc == 0 and "OK" in out


def test_open_file_limit_too_low_is_a_clear_error() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        with pytest.raises(ResourceLimitError, match=r"needs about \d+ open files.*hard limit"):
            raise_open_file_limit(hard + 1)
    assert raise_open_file_limit(16) >= 16

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeferry",
            "sim",
            "run",
            "--broker",
            f"mqtt://127.0.0.1:{free_port()}",
            "--devices",
            "1000",
        ],
        capture_output=True,
        text=True,
        preexec_fn=low_limit,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "at most 512" in line, line


def test_verify_reads_a_sqlite_sink(tmp_path: Path) -> None:
    from gateway.sinks import open_sink

    manifest = {
        "format": "edgeferry-sim-manifest",
        "version": 1,
        "run": "r9",
        "devices": {
            "dev-0000": {"streams": {"temperature": {"first": 1, "last": 4, "dropped": [[4, 4]]}}}
        },
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))

    def event(seq: int) -> bytes:
        return json.dumps(
            {
                "specversion": "1.0",
                "id": str(seq),
                "source": "/s/devices/dev-0000",
                "type": "io.edgeferry.telemetry.temperature",
                "simrun": "r9",
                "data": {"seq": seq, "value": 20.0},
            }
        ).encode()

    sink = open_sink(f"sqlite:{tmp_path / 'sink.db'}")
    sink.write(
        [
            ("n1", 1, "telemetry", i, 0, "dt/dev-0000/temperature", event(seq))
            for i, seq in enumerate((1, 3, 3), start=1)
        ]
    )
    sink.close()
    args = [
        "sim",
        "verify",
        "--manifest",
        str(tmp_path / "m.json"),
        "--sink",
        f"sqlite:{tmp_path / 'sink.db'}",
        "--json",
    ]
    r = runner.invoke(app, args)
    report = json.loads(r.output)
    assert r.exit_code == 1 and not report["ok"]
    t = report["total"]
    assert (t["sent"], t["delivered"], t["dropped"], t["lost"], t["duplicated"]) == (4, 2, 1, 1, 1)
    assert report["devices"][0]["lost_ranges"] == {"temperature": [[2, 2]]}


def test_sim_run_shows_progress_and_writes_the_manifest(
    edge_broker: Broker, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.json"
    r = runner.invoke(
        app,
        [
            "sim",
            "run",
            "--broker",
            edge_broker.url,
            "--devices",
            "3",
            "--interval",
            "0.1",
            "--duration",
            "1.5",
            "--seed",
            "4",
            "--sensors",
            "temperature",
            "--manifest",
            str(manifest),
            "--stats-every",
            "0.5",
        ],
    )
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "connected 3/3" in out and "msg/s (target 30.0)" in out, out
    assert "stats {" in out and "run sim-" in out and "sent " in out
    m = json.loads(manifest.read_text())
    assert m["complete"] and m["seed"] == 4 and len(m["devices"]) == 3
    assert m["totals"]["sent"] == m["totals"]["acked"] > 30


def test_plan_prints_the_seeded_fault_schedule() -> None:
    args = ["sim", "plan", "--devices", "20", "--seed", "3", "--fault", "drop:devices=0.25,at=5..9"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    c = runner.invoke(app, [*args[:4], "4", *args[5:]])
    assert a.exit_code == 0 and a.output == b.output and a.output != c.output
    plan = json.loads(a.output)["plan"]
    assert len(plan) == 5
    assert all(5 <= f["timed"][0][0] <= 9 and f["timed"][0][1] == "drop" for f in plan.values())
    rc, out = _err(["sim", "plan", "--fault", "drop:at=soon"])
    assert rc == 2 and out.startswith("error:")
