"""The command line: every command has help with an example; errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer.main

from edgeferry.cli import app

PY = sys.executable


def _commands(group=None, prefix=()):
    click_group = typer.main.get_command(app) if group is None else group
    for name, cmd in click_group.commands.items():
        path = (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, path)
        else:
            yield path


ALL = sorted(_commands())


def run(*args, timeout=60):
    return subprocess.run([PY, "-m", "edgeferry", *args], capture_output=True, text=True, timeout=timeout)


def test_the_core_commands_exist():
    assert {("gateway", "run"), ("gateway", "status"), ("ingest", "run"), ("chaos",), ("demo",)} <= set(ALL)


@pytest.mark.parametrize("path", ALL, ids=["/".join(p) for p in ALL])
def test_every_command_has_help_with_an_example(path):
    r = run(*path, "--help")
    assert r.returncode == 0, r.stderr
    assert "example" in r.stdout.lower(), f"{' '.join(path)} --help shows no example"


@pytest.mark.parametrize(
    "args, message",
    [
        (["gateway", "run", "--cloud", "nope", "--node-id", "x"], "is not of the form mqtt://HOST:PORT"),
        (["gateway", "run", "--node-id", "x"], "--cloud is required"),
        (["gateway", "run", "--cloud", "mqtt://h:1", "--node-id", "x", "--window", "abc"], "--window"),
        (["ingest", "run", "--cloud", "mqtt://h:1", "--sink", "csv:x"], "jsonl:PATH, sqlite:PATH or postgresql://"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, message):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_status_of_a_missing_store_is_one_line(tmp_path):
    r = run("gateway", "status", "--store", str(tmp_path / "nope.db"))
    assert r.returncode == 1
    assert "no store at" in r.stderr and "Traceback" not in r.stderr


def test_status_reads_the_store_when_no_gateway_runs(tmp_path):
    from gateway.store import LaneSpec, Store

    s = Store(tmp_path / "s.db", [LaneSpec("telemetry", ("dt/#",))], node_id="pi-9")
    s.open()
    s.commit([("telemetry", "dt/a/b", b"x" * 10, 1795805035000, 1)])
    s.close()
    r = run("gateway", "status", "--store", str(tmp_path / "s.db"), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["running"] is False and st["node_id"] == "pi-9"
    assert st["lanes"]["telemetry"]["records"] == 1


def test_gateway_run_does_not_import_heavy_modules():
    """The gateway's resident memory is a feature: no typer, rich or pydantic on its path."""
    code = (
        "import sys\n"
        "from edgeferry.__main__ import main\n"
        "from gateway.main import run_gateway\n"
        "import gateway.gateway, gateway.health\n"
        "bad = [m for m in ('typer', 'rich', 'pydantic', 'prometheus_client') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported on the gateway's path: {r.stdout}"


def test_demo_refuses_an_outage_past_its_end():
    r = run("demo", "--duration", "20", "--outage-at", "15", "--outage-for", "10")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: the outage must end before --duration "
                                             "(outage-at + outage-for < duration)"], r.stderr
