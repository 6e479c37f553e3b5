"""The examples in docs/services.md work as written."""

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "services.md"


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


async def test_the_guide_example_service_and_its_test(tmp_path, monkeypatch):
    service_src, test_src = [b for b in blocks("python") if "overheat" in b][:2]
    assert "svc = Service(" in service_src and "MemoryBroker" in test_src
    assert len(service_src.strip().splitlines()) <= 30  # "a useful service in 20-30 lines"
    (tmp_path / "overheat.py").write_text(service_src)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("overheat", None)
    ns: dict = {}
    exec(compile(test_src, "docs/services.md", "exec"), ns)
    await ns["test_overheat"]()
    sys.modules.pop("overheat", None)


def test_the_documented_settings_exist():
    from edge._runner import OPTIONS

    flags = {o.flag for o in OPTIONS}
    documented = set(re.findall(r"`(--[a-z-]+)`", DOC.read_text()))
    assert (
        documented - {"--builtins", "--json", "--asyncapi", "--diagram", "--config", "--quick"}
        <= flags
    )


async def test_the_guide_example_runs_as_a_script(edge_broker, proc_factory, tmp_path):
    """``python overheat.py`` (``svc.run()``): flags, uvloop, SIGTERM -> exit 0."""
    import asyncio

    from edge.testing import TestClient

    [service_src] = [b for b in blocks("python") if "svc.run()" in b]
    (tmp_path / "overheat.py").write_text(service_src)
    p = proc_factory(
        [
            sys.executable,
            "overheat.py",
            "--broker",
            edge_broker.url,
            "--state-dir",
            str(tmp_path / "state"),
            "--node-id",
            "pi-77",
        ],
        "overheat",
        cwd=tmp_path,
    )
    ready = await asyncio.to_thread(p.wait_for_line, r"service overheat ready", 20)
    assert "uvloop loop" in ready.string  # svc.run() runs on uvloop when it is installed
    async with TestClient(edge_broker.url) as tc:
        out = await tc.subscribe("evt/overheat/#")
        await tc.publish_event("dt/pump-1/temperature", {"value": 212, "unit": "F"})
        [m] = await out.wait(1)
    assert m.event.data == {"device": "pump-1", "celsius": 100.0}
    assert m.event.source == "/pi-77/services/overheat"
    assert await asyncio.to_thread(p.terminate, 10) == 0
