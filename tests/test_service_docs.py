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
    assert documented - {"--builtins", "--json", "--asyncapi", "--diagram", "--config"} <= flags
