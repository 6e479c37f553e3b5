"""balena.yml, docker-compose.yml and deploy/docker: checked, not built (no Docker daemon here).

- docker-compose.yml against the Compose specification's JSON schema (the copy that
  check-jsonschema ships, vendored from compose-spec/compose-spec), plus the rules balena
  adds (compose 2.4 fields, depends_on as a list, named volumes only, no container_name);
- balena.yml's fields, device-type slugs and variables (each one a setting that exists);
- the Dockerfiles by a small lint (official multi-arch bases, non-root USER, nothing secret);
- the entrypoints run with sh, and the broker config they render starts a real Mosquitto.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.mqtt import BrokerURL, MQTTClient
from edgeferry.procs import Broker
from edgeferry.provision import provision
from tests.harness import DEVICE_PORT

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
BALENA = yaml.safe_load((REPO / "balena.yml").read_text())

# docs.balena.io, reference/supervisor/docker-compose.md: the supported service fields
BALENA_SERVICE_FIELDS = {
    "build", "cap_add", "cap_drop", "cgroup_parent", "command", "cpu_quota", "cpu_shares", "cpuset",
    "depends_on", "devices", "dns", "dns_opt", "dns_search", "domainname", "entrypoint", "environment",
    "extra_hosts", "group_add", "healthcheck", "hostname", "image", "ipc", "labels", "mac_address",
    "mem_limit", "mem_reservation", "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid",
    "pids_limit", "ports", "privileged", "read_only", "restart", "security_opt", "shm_size",
    "stop_grace_period", "stop_signal", "sysctls", "tmpfs", "ulimits", "user", "userns_mode", "volumes",
    "working_dir",
}
# docs.balena.io, reference/hardware/devices.md: Raspberry Pi device types on aarch64, the
# architecture both base images publish (python:3.11-slim-bookworm, eclipse-mosquitto:2)
AARCH64_PI_SLUGS = {"raspberrypi3-64", "raspberrypi4-64", "raspberrypi5", "raspberrypi0-2w-64",
                    "raspberrypicm4-ioboard"}
BASE_IMAGES = {"python:3.11-slim-bookworm", "eclipse-mosquitto:2"}
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


# ------------------------------------------------------------------ docker-compose.yml


def _compose_schema() -> dict[str, Any]:
    pytest.importorskip("check_jsonschema")
    path = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(path.read_text())


def _validate_compose(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(_compose_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_specification() -> None:
    assert _validate_compose(COMPOSE) == []


def test_the_schema_check_can_fail() -> None:
    bad = json.loads(json.dumps(COMPOSE))
    bad["services"]["gateway"]["restart"] = ["always"]
    bad["services"]["gateway"]["bogus"] = 1
    assert len(_validate_compose(bad)) >= 2


def balena_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    named = set(doc.get("volumes") or {})
    for name, svc in doc["services"].items():
        for key in svc:
            if key not in BALENA_SERVICE_FIELDS:
                problems.append(f"{name}: field {key!r} is not supported by balena")
        if "restart" not in svc:
            problems.append(f"{name}: no restart policy")
        if not isinstance(svc.get("depends_on", []), list):
            problems.append(f"{name}: depends_on must be a list")
        for dep in svc.get("depends_on", []):
            if dep not in doc["services"]:
                problems.append(f"{name}: depends on unknown service {dep!r}")
        for vol in svc.get("volumes", []):
            if not isinstance(vol, str):
                problems.append(f"{name}: volume {vol!r} must use the short syntax")
                continue
            source = vol.split(":")[0]
            if source not in named:
                problems.append(f"{name}: {vol!r} is a bind mount or an undeclared volume")
        build = svc.get("build")
        if build is not None:
            context = REPO / build.get("context", ".")
            if REPO not in (context.resolve(), *context.resolve().parents):
                problems.append(f"{name}: build context outside the project")
            if not (context / build.get("dockerfile", "Dockerfile")).exists():
                problems.append(f"{name}: no {build.get('dockerfile')}")
    return problems


def test_compose_file_follows_balenas_rules() -> None:
    assert balena_problems(COMPOSE) == []
    services = COMPOSE["services"]
    assert {"mosquitto", "gateway", "aggregator", "rules", "sim"} <= set(services)
    assert "mosquitto" in services["gateway"]["depends_on"]
    assert any(v.endswith(":/mosquitto/data") for v in services["mosquitto"]["volumes"])
    assert services["gateway"]["volumes"] == ["gateway-store:/data"]
    assert services["gateway"]["environment"]["EDGEFERRY_STORE"].startswith("/data/")


@pytest.mark.parametrize("mutation, problem", [
    (lambda s: s["gateway"].__setitem__("container_name", "gw"), "container_name"),
    (lambda s: s["gateway"].__setitem__("volumes", ["./store:/data"]), "bind mount"),
    (lambda s: s["gateway"].__setitem__("depends_on", {"mosquitto": {"condition": "service_healthy"}}), "list"),
    (lambda s: s["sim"].__setitem__("profiles", ["trial"]), "profiles"),
    (lambda s: s["rules"].pop("restart"), "restart"),
])
def test_the_balena_check_can_fail(mutation: Callable[[dict[str, Any]], None], problem: str) -> None:
    bad = json.loads(json.dumps(COMPOSE))
    mutation(bad["services"])
    assert any(problem in p for p in balena_problems(bad))


# ------------------------------------------------------------------ balena.yml


def test_balena_yml_fields() -> None:
    b = BALENA
    assert b["type"] == "sw.application"
    assert b["name"] and isinstance(b["name"], str)
    assert SEMVER.match(str(b["version"])), b["version"]
    assert len(b["description"]) > 40
    assert isinstance(b["joinable"], bool)
    assert "edgeferry provision" in b["post-provisioning"]
    for asset in ("repository", "logo"):
        assert b["assets"][asset]["type"] == "blob.asset"
        assert b["assets"][asset]["data"]["url"].startswith("https://")
    assert b["assets"]["logo"]["data"]["url"].endswith("docs/logo.png")
    assert (REPO / "docs" / "logo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_balena_device_types_are_real_aarch64_slugs() -> None:
    data = BALENA["data"]
    supported = data["supportedDeviceTypes"]
    assert set(supported) <= AARCH64_PI_SLUGS, set(supported) - AARCH64_PI_SLUGS
    assert {"raspberrypi4-64", "raspberrypi5", "raspberrypi3-64", "raspberrypi0-2w-64"} <= set(supported)
    assert data["defaultDeviceType"] in supported


def test_balena_variables_are_settings_that_exist() -> None:
    """Each fleet variable is read by something: a gateway setting (parsed here with the
    gateway's own parser, so a bad default fails) or the entrypoint (the simulator switch)."""
    from gateway.settings import GATEWAY_OPTIONS, gateway_settings

    env: dict[str, str] = {}
    for item in BALENA["data"]["applicationEnvironmentVariables"]:
        assert isinstance(item, dict) and len(item) == 1
        env.update({k: str(v) for k, v in item.items()})
    assert {"EDGEFERRY_CLOUD", "EDGEFERRY_CLOUD_PROFILE", "EDGEFERRY_LANES", "EDGEFERRY_MAX_STORE_BYTES"} <= set(env)
    gateway_envs = {o.env for o in GATEWAY_OPTIONS}
    entrypoint = (DOCKER / "edgeferry-entrypoint.sh").read_text()
    for name in env:
        assert name in gateway_envs or name in entrypoint, f"{name} is read by nothing"
    settings = gateway_settings(["--node-id", "pi-01"], environ={k: v for k, v in env.items() if k in gateway_envs})
    assert [lane.name for lane in settings.lanes] == ["events", "telemetry"]
    assert settings.max_store_bytes == 256 * 1024 * 1024
    assert settings.cloud_profile == "generic"


# ------------------------------------------------------------------ Dockerfiles


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    stages = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    for image in stages:
        if image not in BASE_IMAGES:
            problems.append(f"base image {image} is not one of {sorted(BASE_IMAGES)}")
    final = instructions[max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM ")):]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    if not users or users[-1] in ("root", "0") or users[-1].startswith("0:"):
        problems.append("the final stage does not switch to a non-root USER")
    for line in instructions:
        word = line.split()[0].upper()
        if word in ("ENV", "ARG") and re.search(r"(PASSWORD|SECRET|TOKEN|_KEY)\b\s*[= ]\s*\S", line, re.I):
            problems.append(f"a secret in the image: {line}")
        if word in ("COPY", "ADD"):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for src in sources:
                if re.search(r"\.(key|pem|p12|password)$|secrets|credentials|balena\.env", src):
                    problems.append(f"copies secret material: {src}")
                if "--from=" not in line and not list(REPO.glob(src)):
                    problems.append(f"copies {src}, which does not exist")
        if word == "ADD" and "://" in line:
            problems.append(f"fetches at build time: {line}")
    return problems


@pytest.mark.parametrize("name", ["edgeferry.Dockerfile", "mosquitto.Dockerfile"])
def test_dockerfile_lint(name: str) -> None:
    assert dockerfile_problems((DOCKER / name).read_text()) == []


def test_the_dockerfile_lint_can_fail() -> None:
    bad = "FROM python:3.12\nENV MQTT_PASSWORD=hunter2\nCOPY pi-01/tls/node.key /x/\nUSER root\n"
    problems = dockerfile_problems(bad)
    assert len(problems) == 5, problems  # base image, root, secret env, key file, missing source


def test_dockerignore_keeps_the_venv_and_git_out() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


# ------------------------------------------------------------------ entrypoints


@pytest.mark.parametrize("script", sorted(p.name for p in DOCKER.glob("*.sh")))
def test_entrypoints_parse(script: str) -> None:
    subprocess.run(["sh", "-n", str(DOCKER / script)], check=True, timeout=10)


def _fake_edgeferry(tmp_path: Path) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True)
    fake = bindir / "edgeferry"
    fake.write_text('#!/bin/sh\nenv | grep "^EDGEFERRY_" | sort > "$HOME/env.out"\necho "$@" > "$HOME/argv.out"\n')
    fake.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(home)}


def _balena_env(node: Path, service: str) -> dict[str, str]:
    text = (node / "balena" / f"{service}.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_provision_writes_variables_for_each_compose_service(tmp_path: Path) -> None:
    node = tmp_path / "node"
    provision("pi-11", tmp_path / "ca", node, device_classes=["sim"])
    files = {p.stem for p in (node / "balena").iterdir()}
    assert files == {"mosquitto", "gateway", "aggregator", "rules", "sim"} == set(COMPOSE["services"])
    assert "EDGEFERRY_TLS_KEY_B64" not in (node / "balena" / "mosquitto.env").read_text()
    assert "EDGEFERRY_BROKER_PASSWD_B64" not in (node / "balena" / "gateway.env").read_text()
    for service in ("aggregator", "rules", "sim"):  # what the entrypoint looks for
        assert f"EDGEFERRY_{service.upper()}_PASSWORD" in _balena_env(node, service)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (node / "balena").iterdir())


def test_gateway_entrypoint_takes_identity_from_variables(tmp_path: Path) -> None:
    node = tmp_path / "node"
    provision("pi-07", tmp_path / "ca", node)
    balena_env = _balena_env(node, "gateway")
    env = _fake_edgeferry(tmp_path) | {"EDGEFERRY_ROLE": "gateway"} | {
        k: balena_env[k] for k in ("EDGEFERRY_GATEWAY_PASSWORD", "EDGEFERRY_TLS_CERT_B64",
                                   "EDGEFERRY_TLS_KEY_B64", "EDGEFERRY_TLS_CA_B64")}
    r = subprocess.run(["sh", str(DOCKER / "edgeferry-entrypoint.sh"), "gateway", "run"], env=env,
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    home = Path(env["HOME"])
    seen = dict(line.split("=", 1) for line in (home / "env.out").read_text().splitlines())
    password = balena_env["EDGEFERRY_GATEWAY_PASSWORD"]
    # the password goes to a 0600 file the gateway reads at every connect, not into the URL
    assert seen["EDGEFERRY_LOCAL"] == f"mqtt://gateway@mosquitto:{DEVICE_PORT}"
    pwfile = Path(seen["EDGEFERRY_LOCAL_PASSWORD_FILE"])
    assert pwfile.read_text() == password + "\n" and stat.S_IMODE(pwfile.stat().st_mode) == 0o600
    assert password not in (home / "env.out").read_text() + (home / "argv.out").read_text()
    from gateway.settings import gateway_settings

    gw = gateway_settings(["--node-id", "pi-07", "--cloud", "mqtt://cloud.example"],
                          environ={k: v for k, v in seen.items() if k.startswith("EDGEFERRY_LOCAL")})
    assert gw.local_password_file == str(pwfile) and gw.notes == ()
    assert "EDGEFERRY_GATEWAY_PASSWORD" not in seen and "EDGEFERRY_TLS_KEY_B64" not in seen
    key = Path(seen["EDGEFERRY_KEY_FILE"])
    assert key.read_bytes() == (node / "tls" / "node.key").read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert Path(seen["EDGEFERRY_CERT_FILE"]).read_bytes() == (node / "tls" / "node.crt").read_bytes()
    assert password not in r.stdout + r.stderr


def test_service_and_sim_entrypoints(tmp_path: Path) -> None:
    env = _fake_edgeferry(tmp_path) | {"EDGEFERRY_ROLE": "rules", "EDGEFERRY_RULES_PASSWORD": "pw-rules",
                                       "EDGEFERRY_AGGREGATOR_PASSWORD": "pw-agg"}
    subprocess.run(["sh", str(DOCKER / "edgeferry-entrypoint.sh"), "service", "run", "x:y"], env=env,
                   check=True, timeout=10)
    home = Path(env["HOME"])
    seen = dict(line.split("=", 1) for line in (home / "env.out").read_text().splitlines())
    # the password goes to a 0600 file the service reads at every connect, not into its environment
    assert seen["EDGEFERRY_USERNAME"] == "rules" and "EDGEFERRY_PASSWORD" not in seen
    pwfile = Path(seen["EDGEFERRY_PASSWORD_FILE"])
    assert pwfile.read_text() == "pw-rules\n" and stat.S_IMODE(pwfile.stat().st_mode) == 0o600
    assert "pw-rules" not in (home / "env.out").read_text() + (home / "argv.out").read_text()
    assert "EDGEFERRY_RULES_PASSWORD" not in seen
    from edge._runner import OPTIONS
    from edge.config import load_settings

    settings = load_settings(OPTIONS, [], prog="rules", description="", section="service", environ=seen)
    assert (settings["username"], settings["password_file"], settings["password"]) == ("rules", str(pwfile), None)
    # the simulated fleet is off by default: exit 0 without running anything
    env = _fake_edgeferry(tmp_path / "s") | {"EDGEFERRY_ROLE": "sim"}
    r = subprocess.run(["sh", str(DOCKER / "edgeferry-entrypoint.sh")], env=env, capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0 and "simulated fleet off" in r.stdout
    assert not (Path(env["HOME"]) / "argv.out").exists()
    env |= {"EDGEFERRY_SIM_DEVICES": "50", "EDGEFERRY_SIM_PASSWORD": "pw-sim"}
    subprocess.run(["sh", str(DOCKER / "edgeferry-entrypoint.sh")], env=env, check=True, timeout=10)
    argv = (Path(env["HOME"]) / "argv.out").read_text().split()
    assert argv[:6] == ["sim", "run", "--broker", f"mqtt://mosquitto:{DEVICE_PORT}", "--username", "sim"]
    assert argv[6] == "--password-file" and "pw-sim" not in argv
    password_file = Path(argv[7])
    assert password_file.read_text() == "pw-sim\n" and stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert argv[8:10] == ["--devices", "50"]


def test_mosquitto_image_config_starts_locked_down(tmp_path: Path, broker_factory: Callable[..., Broker]) -> None:
    """What the mosquitto image does: render the config at build time, write passwd and
    acl from the variables at start; here the rendered file starts a real Mosquitto."""
    node = tmp_path / "node"
    provision("pi-08", tmp_path / "ca", node, device_classes=["sim"])
    balena_env = _balena_env(node, "mosquitto")
    run = tmp_path / "run"
    run.mkdir()
    fake_mosquitto = tmp_path / "exec.sh"
    fake_mosquitto.write_text("#!/bin/sh\necho started\n")
    fake_mosquitto.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "EDGEFERRY_MOSQUITTO_RUN": str(run),
           "EDGEFERRY_BROKER_PASSWD_B64": balena_env["EDGEFERRY_BROKER_PASSWD_B64"],
           "EDGEFERRY_BROKER_ACL_B64": balena_env["EDGEFERRY_BROKER_ACL_B64"]}
    r = subprocess.run(["sh", str(DOCKER / "mosquitto-entrypoint.sh"), str(fake_mosquitto)], env=env,
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and r.stdout.strip() == "started", r.stderr
    assert (run / "passwd").read_bytes() == base64.b64decode(balena_env["EDGEFERRY_BROKER_PASSWD_B64"])
    assert stat.S_IMODE((run / "passwd").stat().st_mode) == 0o600
    missing = subprocess.run(["sh", str(DOCKER / "mosquitto-entrypoint.sh"), "true"],
                             env={"PATH": os.environ["PATH"], "EDGEFERRY_MOSQUITTO_RUN": str(run)},
                             capture_output=True, text=True, timeout=10)
    assert missing.returncode == 1 and "edgeferry provision" in missing.stderr

    conf = tmp_path / "mosquitto.conf"
    mosq = REPO / "deploy" / "mosquitto"
    rendered = subprocess.run(["sh", str(mosq / "render-conf.sh"), str(mosq / "edge.conf"),
                               str(mosq / "site.conf.in"), str(run), str(tmp_path / "data")],
                              check=True, capture_output=True, text=True, timeout=10).stdout
    conf.write_text(rendered)
    active = [line for line in rendered.splitlines() if line and not line.startswith("#")]
    assert "allow_anonymous false" in active and "allow_anonymous true" not in active
    broker = broker_factory(conf)

    async def check() -> None:
        pw = (node / "credentials" / "sim.password").read_text().strip()
        async with MQTTClient(BrokerURL(broker.host, broker.port, False, "sim", pw), "sim-1"):
            pass
        from edge.errors import ConnectError

        with pytest.raises(ConnectError, match="not authorized"):
            await MQTTClient(BrokerURL(broker.host, broker.port), "anon").connect()

    import asyncio

    asyncio.run(check())


def test_shell_scripts_have_no_bashisms_for_busybox() -> None:
    """The mosquitto image is Alpine (busybox sh and sed): no GNU-only sed alternation."""
    if shutil.which("dash") is None:
        pytest.skip("dash is not installed")
    for script in [*DOCKER.glob("*.sh"), REPO / "deploy" / "mosquitto" / "render-conf.sh"]:
        subprocess.run(["dash", "-n", str(script)], check=True, timeout=10)
        assert "\\|" not in script.read_text(), script
