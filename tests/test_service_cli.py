"""``edgeferry service run`` and ``edgeferry catalog``: help, errors, outputs, and the
built-in rules service run from the CLI against a real Mosquitto."""

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edge.testing import TestClient
from edgeferry.cli import app

REPO = Path(__file__).resolve().parents[1]

USER_SERVICE = textwrap.dedent("""
    from pydantic import BaseModel
    from edge import Service

    class Reading(BaseModel):
        value: float

    class Doubled(BaseModel):
        value: float
        original: Reading

    svc = Service("doubler", description="doubles readings")

    @svc.on("dt/{device}/temperature", publishes=[("evt/doubled/{device}", Doubled)])
    async def double(device: str, reading: Reading) -> None:
        doubled = Doubled(value=reading.value * 2, original=reading)
        await svc.publish(f"evt/doubled/{device}", doubled)
""")


def edgeferry(*args, cwd=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "edgeferry", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    for args in (["service", "--help"], ["service", "run", "--help"], ["catalog", "--help"]):
        if args[:2] == ["service", "run"]:
            res = edgeferry(*args)  # the fast path, without typer
            out = res.stdout
        else:
            res = runner.invoke(app, args)
            out = res.output
        assert res.returncode == 0 if hasattr(res, "returncode") else res.exit_code == 0, out
        assert "xample" in out, (args, out)
    assert "service" in runner.invoke(app, ["--help"]).output


@pytest.mark.parametrize(
    "args,message",
    [
        (["service", "run", "nosuchmodule:svc"], "cannot import 'nosuchmodule'"),
        (["service", "run", "edge.services.rules"], "is not MODULE:ATTR"),
        (["service", "run", "edge.services.rules:service", "--concurrency", "0"], "--concurrency"),
        (["service", "run", "edge.services.rules:service", "--broker", "http://x"], "scheme"),
        (["catalog"], "no services"),
        (["catalog", "edge.services.rules:nothing"], "has no attribute"),
    ],
)
def test_errors_are_one_clear_line(args, message):
    res = edgeferry(*args)
    assert res.returncode != 0
    err = res.stderr.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_service_run_does_not_import_typer_or_rich(tmp_path):
    code = (
        "import sys; from edgeferry.__main__ import main; "
        "rc = main(['service', 'run', 'edge.services.rules:service', '--concurrency', '0']); "
        "assert rc == 1, rc; assert 'pydantic' in sys.modules, 'the service was not loaded'; "
        "assert 'typer' not in sys.modules and 'rich' not in sys.modules, 'typer/rich imported'"
    )
    # it loads the service, then stops at the bad setting:
    # everything it imported is on the running path
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr


def test_catalog_tables_json_asyncapi_and_diagram(tmp_path):
    (tmp_path / "doubler_mod.py").write_text(USER_SERVICE)
    cfg = tmp_path / "services.yaml"
    cfg.write_text("services:\n  - doubler_mod:svc\n  - edge.services.rules:service\n")
    res = edgeferry(
        "catalog",
        "--config",
        str(cfg),
        "--json",
        "--asyncapi",
        "api.yaml",
        "--diagram",
        "graph.mmd",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    cat = json.loads(res.stdout)
    svcs = {s["name"]: s for s in cat["services"]}
    assert set(svcs) == {"doubler", "rules"}
    [consumes] = svcs["doubler"]["consumes"]
    assert (
        consumes["topic"] == "dt/{device}/temperature" and consumes["filter"] == "dt/+/temperature"
    )
    assert (
        consumes["model"] == "Reading"
        and consumes["schema"]["properties"]["value"]["type"] == "number"
    )
    published = {p["topic"]: p for p in svcs["doubler"]["publishes"]}
    assert set(published) == {
        "evt/doubled/{device}",
        "state/doubler",
        "state/doubler/heartbeat",
        "dlq/doubler",
    }
    assert published["evt/doubled/{device}"]["model"] == "Doubled"
    assert {p["topic"] for p in svcs["rules"]["publishes"]} >= {"evt/alert/{device}"}

    doc = yaml.safe_load((tmp_path / "api.yaml").read_text())
    assert doc["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {
        "dt/{device}/temperature",
        "evt/doubled/{device}",
        "evt/alert/{device}",
        "dlq/rules",
    } <= addresses
    actions = {(k.split(".")[0], v["action"]) for k, v in doc["operations"].items()}
    assert {
        ("doubler", "receive"),
        ("doubler", "send"),
        ("rules", "receive"),
        ("rules", "send"),
    } <= actions

    def resolve(ref):
        node = doc
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return node

    refs = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "$ref":
                    refs.append(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    assert refs and all(resolve(r) is not None for r in refs)  # every $ref resolves
    assert "Alert" in doc["components"]["messages"]
    assert "Reading" in doc["components"]["schemas"]  # a nested model, hoisted from $defs

    mmd = (tmp_path / "graph.mmd").read_text()
    assert mmd.startswith("flowchart LR")
    assert '[["doubler"]]' in mmd and '(["evt/doubled/{device}"])' in mmd and "-->" in mmd
    # human tables
    res = edgeferry("catalog", "doubler_mod:svc", "--builtins", cwd=tmp_path)
    assert (
        res.returncode == 0
        and "dt/{device}/temperature" in res.stdout
        and "aggregator" in res.stdout
    )


def test_catalog_image_needs_graphviz(tmp_path):
    import shutil

    res = edgeferry("catalog", "--builtins", "--diagram", str(tmp_path / "g.svg"))
    assert (tmp_path / "g.mmd").exists()
    if shutil.which("dot"):
        assert res.returncode == 0 and (tmp_path / "g.svg").read_text().lstrip().startswith("<")
    else:
        assert res.returncode == 1 and "needs graphviz" in res.stderr


async def test_builtin_rules_runs_from_the_cli(edge_broker, proc_factory, tmp_path):
    cfg = REPO / "deploy" / "services" / "rules.yaml"
    p = proc_factory(
        [
            sys.executable,
            "-m",
            "edgeferry",
            "service",
            "run",
            "edge.services.rules:service",
            "--config",
            str(cfg),
            "--broker",
            edge_broker.url,
            "--state-dir",
            str(tmp_path),
        ],
        "rules",
    )
    await asyncio.to_thread(p.wait_for_line, r"service rules ready", 20)
    async with TestClient(edge_broker.url) as tc:
        alerts = await tc.subscribe("evt/alert/#")
        await tc.publish("dt/kitchen/temperature", b"22")
        await tc.publish_event("dt/kitchen/temperature", {"value": 35.5, "unit": "C"})
        [a] = await alerts.wait(1)
    assert a.topic == "evt/alert/kitchen"
    assert (a.event.data["rule"], a.event.data["state"], a.event.data["severity"]) == (
        "too-hot",
        "firing",
        "critical",
    )
    rc = await asyncio.to_thread(p.terminate, 10)
    assert rc == 0


async def test_builtin_aggregator_runs_from_the_cli(edge_broker, proc_factory, tmp_path):
    cfg = tmp_path / "agg.yaml"
    cfg.write_text(
        "aggregator:\n  window: 10s\n  streams: [temperature]\nservice:\n  heartbeat: 1h\n"
    )
    p = proc_factory(
        [
            sys.executable,
            "-m",
            "edgeferry",
            "service",
            "run",
            "edge.services.aggregator:service",
            "--config",
            str(cfg),
            "--broker",
            edge_broker.url,
            "--state-dir",
            str(tmp_path),
        ],
        "aggregator",
    )
    await asyncio.to_thread(p.wait_for_line, r"service aggregator ready", 20)
    async with TestClient(edge_broker.url) as tc:
        out = await tc.subscribe("evt/aggregate/#")
        for t, v in (
            ("2026-01-01T00:00:01Z", 1),
            ("2026-01-01T00:00:05Z", 3),
            ("2026-01-01T00:00:11Z", 9),
        ):
            await tc.publish_event("dt/fridge/temperature", {"value": v}, time=t)
        [a] = await out.wait(1)
    assert a.topic == "evt/aggregate/fridge"
    d = a.event.data
    assert (d["count"], d["min"], d["max"], d["mean"], d["window_end"] - d["window_start"]) == (
        2,
        1,
        3,
        2,
        10,
    )
    assert await asyncio.to_thread(p.terminate, 10) == 0


@pytest.mark.parametrize(
    "source,message",
    [
        ('x = 1\nraise RuntimeError("oops")\n', "failed (line 2): RuntimeError: oops"),
        ("def f(:\n", "SyntaxError"),
        (
            'from edge import Service\nsvc = Service("a")\n@svc.on("dt/{device}/x")\n'
            "async def h(m: int) -> None: ...\n",
            "placeholder(s) device",
        ),
    ],
)
@pytest.mark.parametrize("command", [["service", "run"], ["catalog"]])
def test_a_broken_service_module_is_one_clear_line(tmp_path, source, message, command):
    (tmp_path / "broken_mod.py").write_text(source)
    res = edgeferry(*command, "broken_mod:svc", cwd=tmp_path)
    err = res.stderr.strip()
    assert res.returncode == 1 and message in err and len(err.splitlines()) == 1, err
