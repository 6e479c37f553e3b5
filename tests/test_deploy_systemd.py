"""deploy/systemd: the units say what docs/deploy.md promises, and systemd itself accepts them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "deploy" / "systemd"
EDGEFERRY_UNITS = ["edgeferry-gateway.service", "edgeferry-ingest.service", "edgeferry-service@.service"]
INSTALLED_BIN = "/opt/edgeferry/venv/bin/edgeferry"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> values (keys may repeat; an empty value resets)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        values = out[section].setdefault(key.strip(), [])
        if value.strip() == "":
            values.clear()
        else:
            values.append(value.strip())
    return out


@pytest.mark.parametrize("name", EDGEFERRY_UNITS)
def test_unit_has_notify_watchdog_restart_and_hardening(name: str) -> None:
    svc = parse_unit(UNITS / name)["Service"]
    one = {k: v[-1] for k, v in svc.items() if v}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["WatchdogSec"].rstrip("s").isdigit()
    assert one["Restart"] == "on-failure"
    assert one.get("DynamicUser") == "yes" or "User" in one
    assert one["StateDirectory"].startswith("edgeferry-")
    assert one["ExecStart"].startswith(INSTALLED_BIN + " ")
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "PrivateDevices": "yes"}.items():
        assert one.get(key) == value, f"{name}: {key}={one.get(key)}, want {value}"
    # the state the component writes lives in its StateDirectory (the only writable path)
    assert "ReadWritePaths" not in one
    assert one.get("CapabilityBoundingSet", "") == ""


def test_gateway_store_is_in_its_state_directory() -> None:
    svc = parse_unit(UNITS / "edgeferry-gateway.service")["Service"]
    state = svc["StateDirectory"][-1]
    env = dict(e.split("=", 1) for e in svc["Environment"])
    assert env["EDGEFERRY_STORE"].startswith(f"/var/lib/{state}/")


def _verify(tmp_path: Path, units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)


@pytest.fixture
def verify_dir(tmp_path: Path) -> Path:
    """The units with ExecStart pointed at this venv's edgeferry (systemd-analyze verify
    refuses a unit whose binary is missing, and /opt/edgeferry is not installed here)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    here = Path(sys.executable).parent / "edgeferry"
    assert here.exists()
    for path in UNITS.iterdir():
        if path.is_file():
            text = path.read_text().replace(INSTALLED_BIN, str(here))
            name = path.name.replace("@.service", "@rules.service")  # a template is verified as an instance
            (tmp_path / name).write_text(text)
    return tmp_path


def test_systemd_analyze_verify_accepts_the_units(verify_dir: Path) -> None:
    units = sorted(p for p in verify_dir.iterdir() if p.suffix in (".service", ".target"))
    assert len(units) == 4
    r = _verify(verify_dir, units)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr + r.stdout


def test_systemd_analyze_verify_accepts_the_mosquitto_drop_in(verify_dir: Path) -> None:
    debian_unit = Path("/lib/systemd/system/mosquitto.service")
    if not debian_unit.exists():
        pytest.skip("Debian's mosquitto.service is not installed")
    shutil.copy(debian_unit, verify_dir / "mosquitto.service")
    shutil.copytree(UNITS / "mosquitto.service.d", verify_dir / "mosquitto.service.d")
    r = _verify(verify_dir, [verify_dir / "mosquitto.service"])
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr + r.stdout


def test_the_verify_check_can_fail(verify_dir: Path) -> None:
    """The check above would see a misspelt key (a warning) or a missing binary (an error)."""
    gw = verify_dir / "edgeferry-gateway.service"
    gw.write_text(gw.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    r = _verify(verify_dir, [gw])
    assert "Unknown key" in r.stderr
    gw.write_text(gw.read_text().replace(str(Path(sys.executable).parent / "edgeferry"), "/nonexistent/edgeferry"))
    assert _verify(verify_dir, [gw]).returncode != 0
