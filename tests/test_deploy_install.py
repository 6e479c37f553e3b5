"""deploy/install.sh and uninstall.sh in a throwaway root (--destdir): idempotent, secrets
private, the store kept unless --purge; bash -n and shellcheck on every script."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from edgeferry.provision import provision
from tests.harness import DEVICE_PORT

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = [REPO / "deploy" / "install.sh", REPO / "deploy" / "uninstall.sh",
           REPO / "deploy" / "mosquitto" / "render-conf.sh", *sorted((REPO / "deploy" / "docker").glob("*.sh"))]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    shell = "bash" if script.read_text().startswith("#!/bin/bash") else "sh"
    subprocess.run([shell, "-n", str(script)], check=True, timeout=10)


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n ran above")
    r = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def tree_hash(root: Path) -> str:
    """Paths, modes and contents of everything below root."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        h.update(f"{path.relative_to(root)} {stat.S_IMODE(st.st_mode):o} {stat.S_IFMT(st.st_mode)}\n".encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def fake_python(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A python3 whose '-m venv DIR' makes a venv with a pip that logs its calls: the
    real step installs edgeferry and its dependencies from an index (a minute, and the
    network), which is not what this test is about; the stamp that skips it is."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    log = tmp_path / "pip.log"
    (bindir / "python3").write_text(
        "#!/bin/sh\n"
        '[ "$1" = -m ] && [ "$2" = venv ] || exit 3\n'
        'mkdir -p "$3/bin"\n'
        'printf "#!/bin/sh\\n" > "$3/bin/python"\n'
        f'printf "#!/bin/sh\\necho \\"\\$*\\" >> {log}\\n" > "$3/bin/pip"\n'
        'chmod +x "$3/bin/python" "$3/bin/pip"\n')
    (bindir / "python3").chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, log


def _install(destdir: Path, env: dict[str, str], *args: str) -> str:
    r = subprocess.run(["bash", str(REPO / "deploy" / "install.sh"), "--destdir", str(destdir), *args],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_install_twice_changes_nothing(tmp_path: Path, fake_python: tuple[dict[str, str], Path]) -> None:
    env, pip_log = fake_python
    node = tmp_path / "pi-01"
    provision("pi-01", tmp_path / "ca", node, device_classes=["sim"])
    root = tmp_path / "root"
    first = _install(root, env, "--provisioned", str(node))
    assert "installed edgeferry" in first
    before = tree_hash(root)
    second = _install(root, env, "--provisioned", str(node))
    after = tree_hash(root)
    print(f"[install] first run: {len(first.splitlines())} changes; second run: {second.strip()!r}")
    assert second.strip() == "edgeferry install: nothing to change"
    assert after == before
    assert len(pip_log.read_text().splitlines()) == 1  # the venv was not reinstalled

    assert "pure Python" not in first  # the fake venv's python imports anything

    etc = root / "etc" / "edgeferry"
    for secret in (etc / "tls" / "node.key", *(etc / "secrets").iterdir()):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE((etc / "secrets").stat().st_mode) == 0o700
    assert (etc / "gateway.yaml").read_text() == (node / "node.yaml").read_text()
    conf = (etc / "mosquitto" / "mosquitto.conf").read_text()
    assert "password_file /etc/edgeferry/mosquitto/passwd" in conf
    assert "allow_anonymous false" in conf.splitlines()
    units = root / "etc" / "systemd" / "system"
    assert {p.name for p in units.iterdir()} >= {"edgeferry-gateway.service", "edgeferry-service@.service",
                                                  "edgeferry.target", "mosquitto.service.d"}


def test_gateway_unit_gets_its_local_password_as_a_file(tmp_path: Path,
                                                       fake_python: tuple[dict[str, str], Path]) -> None:
    """The installed gateway unit logs in to the local broker with a password file (a
    systemd credential from /etc/edgeferry/secrets/gateway.password), not a password in
    EDGEFERRY_LOCAL: what the unit hands over parses with the gateway's own settings."""
    from gateway.settings import gateway_settings
    from tests.test_deploy_systemd import parse_unit

    env, _ = fake_python
    node = tmp_path / "pi-05"
    provision("pi-05", tmp_path / "ca", node)
    root = tmp_path / "root"
    _install(root, env, "--provisioned", str(node))
    svc = parse_unit(root / "etc" / "systemd" / "system" / "edgeferry-gateway.service")["Service"]
    creds = dict(c.split(":", 1) for c in svc.get("LoadCredential", []))
    unit_env = dict(e.split("=", 1) for e in svc["Environment"])
    assert unit_env["EDGEFERRY_LOCAL_PASSWORD_FILE"] == "%d/local-password"
    source = root / creds["local-password"].lstrip("/")  # systemd copies it to %d at start
    password = (node / "credentials" / "gateway.password").read_text().strip()
    assert source.read_text().strip() == password and stat.S_IMODE(source.stat().st_mode) == 0o600
    env_file = root / svc["EnvironmentFile"][-1].lstrip("-/")
    assert password not in env_file.read_text()
    environ = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    settings = gateway_settings(["--node-id", "pi-05", "--cloud", "mqtt://cloud.example"],
                                environ=environ | {"EDGEFERRY_LOCAL_PASSWORD_FILE": str(source)})
    assert settings.local == f"mqtt://gateway@127.0.0.1:{DEVICE_PORT}" and settings.notes == ()


def test_edits_survive_and_changed_sources_are_updated(tmp_path: Path,
                                                       fake_python: tuple[dict[str, str], Path]) -> None:
    env, _ = fake_python
    root = tmp_path / "root"
    _install(root, env)
    services = root / "etc" / "edgeferry" / "services.yaml"
    services.write_text(services.read_text() + "\n# my edit\n")
    unit = root / "etc" / "systemd" / "system" / "edgeferry-gateway.service"
    unit.write_text("stale\n")
    out = _install(root, env)
    assert services.read_text().endswith("# my edit\n")
    assert unit.read_bytes() == (REPO / "deploy" / "systemd" / "edgeferry-gateway.service").read_bytes()
    assert out.splitlines() == ["edgeferry install: wrote /etc/systemd/system/edgeferry-gateway.service",
                                "edgeferry install: done"]


def test_uninstall_keeps_the_store_unless_purge(tmp_path: Path, fake_python: tuple[dict[str, str], Path]) -> None:
    env, _ = fake_python
    root = tmp_path / "root"
    _install(root, env)
    store = root / "var" / "lib" / "edgeferry-gateway" / "store.db"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"records not yet in the cloud")
    uninstall = ["bash", str(REPO / "deploy" / "uninstall.sh"), "--destdir", str(root)]
    subprocess.run(uninstall, check=True, capture_output=True, timeout=30)
    assert store.exists() and (root / "etc" / "edgeferry" / "services.yaml").exists()
    assert not (root / "opt" / "edgeferry").exists()
    assert not (root / "etc" / "systemd" / "system" / "edgeferry-gateway.service").exists()
    subprocess.run([*uninstall, "--purge"], check=True, capture_output=True, timeout=30)
    assert not store.exists() and not (root / "etc" / "edgeferry").exists()


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(REPO / "deploy" / "install.sh"), "--destdir", str(tmp_path), "--provisioned",
                        str(tmp_path / "nothing")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.startswith("error:") and len(r.stderr.splitlines()) == 1


def test_install_says_when_the_c_accelerator_was_not_built(tmp_path: Path,
                                                           fake_python: tuple[dict[str, str], Path]) -> None:
    """A venv whose python cannot import edge._cparse (pip built edgeferry without a C
    compiler): the install says the gateway parses in pure Python, and how to change it."""
    env, _ = fake_python
    root = tmp_path / "root"
    venv_bin = root / "opt" / "edgeferry" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("#!/bin/sh\nexit 1\n")
    (venv_bin / "pip").write_text("#!/bin/sh\n")
    for f in venv_bin.iterdir():
        f.chmod(0o755)
    out = _install(root, env, "--no-systemctl")
    assert "parses MQTT in pure Python" in out and "apt-get install gcc python3-dev" in out, out
