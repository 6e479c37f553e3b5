"""TLS and client identity against a real Mosquitto TLS listener (``require_certificate
true``, ``use_identity_as_username true``), with certificates made here (tests/certs.py).

The pipeline test walks the gateway through each kind of TLS failure while messages
keep arriving: each is refused with its own line (log, ``gateway status``, metrics),
the store keeps everything, and delivery resumes as soon as good files are put in
place, without restarting the gateway. Nothing here talks plaintext to a TLS port or
turns verification off.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge._tls import TLSOptions, explain
from edge.errors import ConfigError, ConnectError
from gateway.settings import gateway_settings, ingest_settings
from tests.certs import CA, tls_dir
from tests.harness import free_port, openssl_in, wait_until
from tests.pipeline import PY, Pipeline

pytestmark = pytest.mark.timeout(120)

SERVER_NAME = "broker.test"
PASSWORD = "pw-Zq81-not-in-logs"
URL_PASSWORD = "url-pw-Zq82-not-in-logs"


class TLSPipeline(Pipeline):
    """local Mosquitto -> gateway -> chaos proxy -> TLS cloud Mosquitto -> ingest, with
    the gateway's and ingest's TLS files in ``self.d`` (rewritten in place by the test)."""

    def __init__(self, tmp_path: Path, broker_factory: Any, proc_factory: Any, chaos: Any) -> None:
        d = self.d = tls_dir(tmp_path)
        self.ca, self.ca2 = CA("edgeferry test CA"), CA("another CA")
        self.ca.write_ca(d / "gw-trust.pem")  # what the gateway trusts
        self.ca.write_ca(d / "ing-trust.pem")  # what ingest trusts
        self.ca.write_ca(d / "broker-trust.pem")  # what the broker trusts for clients
        # the broker's own key must be readable by user mosquitto (see DESIGN.md)
        self.ca.issue(SERVER_NAME, server=True, names=(SERVER_NAME,)).write(
            d / "server.pem", d / "server.key", key_mode=0o644)
        self.ca.issue("pi-1").write(d / "gw.pem", d / "gw.key")
        self.ca.issue("ingest").write(d / "ing.pem", d / "ing.key")
        (d / "gw.pass").write_text(PASSWORD + "\n")
        os.chmod(d / "gw.pass", 0o600)
        super().__init__(tmp_path, _TLSBrokers(broker_factory, d), proc_factory, chaos)
        self.metrics_port = free_port()

    def tls_args(self, who: str) -> list[str]:
        d = self.d
        return ["--ca-file", str(d / f"{who}-trust.pem"), "--cert-file", str(d / f"{who}.pem"),
                "--key-file", str(d / f"{who}.key"), "--tls-server-name", SERVER_NAME]

    def gateway_argv(self, failpoint: str | None = None) -> list[str]:
        argv = super().gateway_argv(failpoint)
        argv[argv.index("--cloud") + 1] = f"mqtts://gw@127.0.0.1:{self.proxy.port}"
        return [*argv, "--backoff-max", "0.5s", "--password-file", str(self.d / "gw.pass"),
                "--metrics-port", str(self.metrics_port), *self.tls_args("gw")]

    def start_ingest(self) -> Any:
        self._ing_runs += 1
        url = f"mqtts://ingest:{URL_PASSWORD}@127.0.0.1:{self.cloud.port}"
        self.ingest = self._procs([PY, "-m", "edgeferry", "ingest", "run", "--cloud", url,
                                   "--sink", self.sink, "--client-id", "ingest-test",
                                   "--backoff-max", "0.5s", *self.tls_args("ing")],
                                  f"ingest{self._ing_runs}")
        self.ingest.wait_for_line(r"ingest connected", 20)
        return self.ingest

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


class _TLSBrokers:
    """broker_factory for Pipeline: the cloud broker gets a TLS listener."""

    def __init__(self, factory: Any, d: Path) -> None:
        self.factory, self.d = factory, d

    def __call__(self, conf: str) -> Any:
        if conf != "cloud":
            return self.factory(conf)
        d = self.d
        return self.factory("cloud", extra=[
            f"cafile {d / 'broker-trust.pem'}", f"certfile {d / 'server.pem'}",
            f"keyfile {d / 'server.key'}", "require_certificate true",
            "use_identity_as_username true"])


@pytest.fixture
def tls_pipe(tmp_path, broker_factory, proc_factory, chaos):
    return TLSPipeline(tmp_path, broker_factory, proc_factory, chaos)


def _refused_phase(pipe: TLSPipeline, kind: str, words: str, run: str, start: int, n: int) -> int:
    """Messages keep coming while the link is refused: wait for the line, the status and
    the metric, and for the store to hold them; return how many were sent."""
    load = pipe.load(n, 0, run, start=start)
    sent = pipe.wait_sent(load, 30)
    pipe.gateway.wait_for_line(words, 20)
    wait_until(lambda: pipe.status()["cloud_state"] == kind, 10, f"status says {kind}")
    st = pipe.status()
    assert st["link"]["cloud"] == "down"
    assert re.search(words, st["cloud_error"]), st["cloud_error"]
    assert f'edgeferry_link_state{{node="pi-1",link="cloud",state="{kind}"}} 1' in pipe.metrics()
    wait_until(lambda: pipe.status()["counters"]["stored"] >= start + sent, 20, "all stored")
    return sent


def test_tls_failures_each_refused_with_its_line_then_delivery_resumes(tls_pipe):
    pipe = tls_pipe
    d = pipe.d
    # 1. unknown CA: the gateway trusts another CA than the one that signed the broker
    pipe.ca2.write_ca(d / "gw-trust.pem")
    pipe.start_ingest()
    pipe.start_gateway()
    sent = _refused_phase(pipe, "tls_unknown_ca", "not signed by a trusted CA", "tls", 0, 200)
    pipe.ca.write_ca(d / "gw-trust.pem")  # the right CA: the next attempt connects
    pipe.wait_delivered(sent, 30)
    assert pipe.status()["cloud_state"] == "up"
    assert 'state="up"} 1' in pipe.metrics()

    # 2. an expired client certificate: the broker refuses it
    pipe.proxy.cut()
    pipe.ca.issue("pi-1", expired=True).write(d / "gw.pem", d / "gw.key")
    pipe.proxy.up()
    total = sent
    total += _refused_phase(pipe, "tls_cert_refused", "refused our client certificate "
                            r"\(certificate expired\)", "tls", total, 200)
    pipe.ca.issue("pi-1").write(d / "gw.pem", d / "gw.key")  # rotated: used without restart
    pipe.wait_delivered(total, 30)

    # 3. the broker's certificate is for another name than --tls-server-name
    pipe.ca.issue("other.test", server=True, names=("other.test",)).write(
        d / "server.pem", d / "server.key", key_mode=0o644)
    pipe.cloud.restart()
    total += _refused_phase(pipe, "tls_hostname", "not valid for this server name", "tls", total, 200)
    pipe.ca.issue(SERVER_NAME, server=True, names=(SERVER_NAME,)).write(
        d / "server.pem", d / "server.key", key_mode=0o644)
    pipe.cloud.restart()
    pipe.wait_delivered(total, 30)

    # 4. revoked by a CA change: the broker now trusts only the new CA; ingest got its new
    # certificate beforehand (and picks it up at its reconnect), the gateway not yet
    pipe.ca2.write_ca(d / "broker-trust.pem")
    pipe.ca2.issue("ingest").write(d / "ing.pem", d / "ing.key")
    pipe.cloud.restart()
    total += _refused_phase(pipe, "tls_cert_refused", r"refused our client certificate \(unknown ca\)",
                            "tls", total, 200)
    pipe.ca2.issue("pi-1").write(d / "gw.pem", d / "gw.key")
    pipe.wait_delivered(total, 30)

    result = pipe.tally("tls", total, label="tls failures and recoveries")
    assert result == {"sent": total, "delivered": total, "lost": 0, "duplicated": 0,
                      "unexpected": 0, "out_of_order": 0}
    assert pipe.status()["drops"] == {}
    # credentials never show: not in logs, status or metrics (argv holds only the file name)
    shown = pipe.gateway.log_text() + pipe.ingest.log_text() + json.dumps(pipe.status()) + pipe.metrics()
    assert PASSWORD not in shown and URL_PASSWORD not in shown
    assert PASSWORD not in " ".join(pipe.gateway_argv())
    assert "holds a password" in pipe.ingest.log_text()  # the URL's password: said, not shown
    # an mqtts:// broker: the gateway loaded the real ssl module (a plaintext one does not,
    # tests/test_nossl.py)
    libs = openssl_in(pipe.gateway.pid)
    assert any(lib.startswith("libssl") for lib in libs) and any(lib.startswith("_ssl.") for lib in libs), libs


async def _socket_closed(*clients: Any) -> None:
    """Wait (up to 5 s) until each TLS client's connection is really gone: an SSL transport
    closes its socket only after the TLS shutdown, after close() returned, and a socket
    still open when the test's event loop ends is a ResourceWarning (an error here)."""
    import asyncio

    loop = asyncio.get_running_loop()
    waits = []
    for c in clients:
        t = c._transport
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is None or sock.fileno() == -1:
            continue
        proto, fut = t.get_protocol(), loop.create_future()
        lost = proto.connection_lost

        def wrapped(exc: Exception | None, lost: Any = lost, fut: Any = fut) -> None:
            lost(exc)
            if not fut.done():
                fut.set_result(None)

        proto.connection_lost = wrapped
        waits.append(fut)
    if waits:
        async with asyncio.timeout(5):
            await asyncio.gather(*waits)


# ---------------------------------------------------------------- settings and units


def _key_file(tmp_path: Path, mode: int) -> tuple[str, str, str]:
    d = tls_dir(tmp_path)
    ca = CA()
    ca_file = ca.write_ca(d / "ca.pem")
    cert, key = ca.issue("pi-1").write(d / "c.pem", d / "c.key", key_mode=mode)
    return ca_file, cert, key


def test_key_readable_by_others_is_refused_with_the_chmod(tmp_path):
    ca_file, cert, key = _key_file(tmp_path, 0o640)
    argv = ["--cloud", "mqtts://cloud.example", "--node-id", "pi-1", "--ca-file", ca_file,
            "--cert-file", cert, "--key-file", key]
    with pytest.raises(ConfigError, match=rf"readable by group or others \(mode 0640\): run chmod 600 {key}"):
        gateway_settings(argv, {})
    os.chmod(key, 0o600)
    s = gateway_settings(argv, {})
    assert s.tls == TLSOptions(ca_file, cert, key)


def test_tls_settings_from_env_and_yaml(tmp_path):
    ca_file, cert, key = _key_file(tmp_path, 0o600)
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    os.chmod(pw, 0o600)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"ingest:\n  cert_file: {cert}\n  key_file: {key}\n  alpn: [x-amzn-mqtt-ca]\n"
                   f"  password_file: {pw}\n")
    env = {"EDGEFERRY_CA_FILE": ca_file, "EDGEFERRY_TLS_SERVER_NAME": "iot.example"}
    s = ingest_settings(["--cloud", "mqtts://cloud.example:443", "--sink", "jsonl:x",
                         "--config", str(cfg)], env)
    assert s.tls == TLSOptions(ca_file, cert, key, "iot.example", ("x-amzn-mqtt-ca",))
    assert s.password_file == str(pw)
    os.chmod(pw, 0o644)
    with pytest.raises(ConfigError, match="password file .* readable by group or others"):
        ingest_settings(["--cloud", "mqtts://cloud.example", "--sink", "jsonl:x", "--config", str(cfg)], env)


def test_tls_files_with_a_plaintext_url_are_refused():
    with pytest.raises(ConfigError, match="--ca-file needs an mqtts:// broker URL"):
        gateway_settings(["--cloud", "mqtt://cloud.example", "--node-id", "n", "--ca-file", "/x"], {})


def test_a_password_in_the_url_is_not_in_error_messages():
    with pytest.raises(ConfigError) as e:
        gateway_settings(["--cloud", "mqtts://u:hunter2@cloud.example:99999", "--node-id", "n"], {})
    assert "hunter2" not in str(e.value) and "u:***@" in str(e.value)


@pytest.mark.parametrize("text,kind", [
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in "
     "certificate chain (_ssl.c:1006)", "tls_unknown_ca"),
    ("certificate verify failed: unable to get local issuer certificate", "tls_unknown_ca"),
    ("certificate verify failed: certificate has expired", "tls_expired"),
    ("certificate verify failed: certificate is not yet valid", "tls_not_yet_valid"),
    ("certificate verify failed: Hostname mismatch, certificate is not valid for 'x'.", "tls_hostname"),
    ("connection lost: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "tls_cert_refused"),
    ("connection lost: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required",
     "tls_cert_refused"),
    ("refused the connection: not authorized", "refused"),
    ("Connect call failed ('127.0.0.1', 9)", "unreachable"),
])
def test_explain_names_the_kind(text, kind):
    assert explain(ConnectError(text))[0] == kind


async def test_mqtts_never_falls_back_and_trusts_the_system_store_by_default(broker_factory, tmp_path):
    """mqtts:// against a plaintext listener fails the handshake (no fallback); against a
    TLS listener signed by our test CA, with no --ca-file, the system store is used and
    does not know that CA."""
    from edge.mqtt import MQTTClient

    plain = broker_factory("cloud")
    c = MQTTClient(f"mqtts://127.0.0.1:{plain.port}", "x", connect_timeout=3)
    with pytest.raises(ConnectError, match="reset|TLS|SSL|closed|lost"):
        await c.connect()
    await _socket_closed(c)
    d = tls_dir(tmp_path)
    ca = CA()
    ca.issue("localhost", server=True, names=("127.0.0.1",)).write(
        d / "s.pem", d / "s.key", key_mode=0o644)
    tls = broker_factory("cloud", extra=[f"certfile {d / 's.pem'}", f"keyfile {d / 's.key'}"])
    c = MQTTClient(f"mqtts://127.0.0.1:{tls.port}", "x", connect_timeout=3)
    with pytest.raises(ConnectError) as e:
        await c.connect()
    assert explain(e.value)[0] == "tls_unknown_ca", e.value
    await _socket_closed(c)
    c = MQTTClient(f"mqtts://127.0.0.1:{tls.port}", "x", connect_timeout=3,
                   tls=TLSOptions(ca.write_ca(d / "ca.pem")))
    await c.connect()
    await c.close()
    await _socket_closed(c)


# ---------------------------------------------------------------- no node poses as another

CLOUD_TLS_CONF = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "cloud-tls"


async def test_a_node_cannot_write_another_nodes_records(broker_factory, proc_factory, tmp_path):
    """deploy/mosquitto/cloud-tls (per-node ACL on the certificate's name) and ingest's
    topic check together: pi-2 publishing a frame that claims pi-1, under pi-1's prefix
    (the broker drops it) or under its own (ingest refuses it), writes nothing."""
    from edge.mqtt import MQTTClient
    from gateway import frames

    d = tls_dir(tmp_path)
    ca = CA()
    ca_file = ca.write_ca(d / "ca.pem")
    ca.issue(SERVER_NAME, server=True, names=(SERVER_NAME,)).write(
        d / "server.pem", d / "server.key", key_mode=0o644)
    broker = broker_factory(CLOUD_TLS_CONF / "cloud-tls.conf", extra=[
        f"cafile {ca_file}", f"certfile {d / 'server.pem'}", f"keyfile {d / 'server.key'}",
        "require_certificate true", "use_identity_as_username true",
        f"acl_file {CLOUD_TLS_CONF / 'cloud.acl'}"])
    url = f"mqtts://127.0.0.1:{broker.port}"

    def identity(cn: str) -> TLSOptions:
        cert, key = ca.issue(cn).write(d / f"{cn}.pem", d / f"{cn}.key")
        return TLSOptions(ca_file, cert, key, SERVER_NAME)

    ing_tls = identity("edgeferry-ingest")
    sink = tmp_path / "sink.jsonl"
    ingest = proc_factory([PY, "-m", "edgeferry", "ingest", "run", "--cloud", url, "--sink",
                           f"jsonl:{sink}", "--client-id", "ingest-acl", "--ca-file", ca_file,
                           "--cert-file", str(ing_tls.cert_file), "--key-file", str(ing_tls.key_file),
                           "--tls-server-name", SERVER_NAME], "ingest")
    ingest.wait_for_line(r"ingest connected", 20)

    def frame(node: str, first: int, n: int, text: str) -> bytes:
        rows = [(seq, 1, "dt/x/t", f"{text}-{seq}".encode()) for seq in range(first, first + n)]
        return frames.encode(node, 7, "telemetry", rows, prev_seq=first - 1)

    async with MQTTClient(url, "pi-1", tls=identity("pi-1")) as pi1, \
            MQTTClient(url, "pi-2", tls=identity("pi-2")) as pi2:
        await pi1.publish("ef/pi-1/up/telemetry", frame("pi-1", 1, 3, "real"))
        # pi-2 poses as pi-1: under pi-1's prefix (ACL), then under its own (ingest)
        await pi2.publish("ef/pi-1/up/telemetry", frame("pi-1", 4, 3, "fake"))
        await pi2.publish("ef/pi-2/up/telemetry", frame("pi-1", 4, 3, "fake"))
        ingest.wait_for_line(r"refused a frame on 'ef/pi-2/up/telemetry' claiming node 'pi-1'", 20)
        await pi1.publish("ef/pi-1/up/telemetry", frame("pi-1", 4, 2, "real"))
        wait_until(lambda: sink.exists() and sink.read_bytes().count(b"\n") >= 5, 20, "5 rows")
    await _socket_closed(pi1, pi2)
    rows = [json.loads(line) for line in sink.read_text().splitlines()]
    payloads = [(r["node"], r["seq"], r["payload"]) for r in rows]
    fake = [p for p in payloads if "fake" in p[2]]
    print(f"[spoofing] sent=5 delivered={len(rows) - len(fake)} lost={5 - len(rows) + len(fake)} "
          f"duplicated=0 spoofed_written={len(fake)}")
    # the frame under pi-1's prefix followed on from seq 3: had the broker let it through,
    # ingest would have written fake-4..6 and dropped the real 4..5 as duplicates
    assert payloads == [("pi-1", s, f"real-{s}") for s in range(1, 6)]


# ---------------------------------------------------------------- services and the simulator

ECHO_SERVICE = '''
from edge import Service

svc = Service("echo", heartbeat=0)


@svc.on("dt/{device}/{stream}")
async def echo(device: str, stream: str, data: dict) -> None:
    await svc.publish(f"evt/echo/{device}", data)
'''


def test_service_run_and_sim_run_over_tls(broker_factory, proc_factory, tmp_path):
    """``service run`` and ``sim run`` (through its chaos proxy, which needs the broker's
    name for the check) reach a broker that requires a client certificate; the broker sees
    each one as its certificate's name."""
    from typer.testing import CliRunner

    from edgeferry.cli import app

    d = tls_dir(tmp_path)
    ca = CA()
    ca_file = ca.write_ca(d / "ca.pem")
    ca.issue(SERVER_NAME, server=True, names=(SERVER_NAME,)).write(
        d / "server.pem", d / "server.key", key_mode=0o644)
    broker = broker_factory("edge", extra=[
        f"cafile {ca_file}", f"certfile {d / 'server.pem'}", f"keyfile {d / 'server.key'}",
        "require_certificate true", "use_identity_as_username true", "log_type notice",
        "log_type debug"])
    url = f"mqtts://127.0.0.1:{broker.port}"
    svc_cert, svc_key = ca.issue("svc-echo").write(d / "svc.pem", d / "svc.key")
    sim_cert, sim_key = ca.issue("sim-fleet").write(d / "sim.pem", d / "sim.key")
    (tmp_path / "echo_mod.py").write_text(ECHO_SERVICE)
    svc = proc_factory([PY, "-m", "edgeferry", "service", "run", "echo_mod:svc", "--broker", url,
                        "--state-dir", str(tmp_path / "state"), "--log-level", "INFO",
                        "--tls-server-name", SERVER_NAME, "--cert-file", svc_cert,
                        "--key-file", svc_key], "echo",
                       env={**os.environ, "EDGEFERRY_CA_FILE": ca_file}, cwd=tmp_path)
    svc.wait_for_line(r"service echo ready", 20)
    r = CliRunner().invoke(app, [
        "sim", "run", "--broker", url, "--devices", "2", "--interval", "0.1", "--duration", "1",
        "--sensors", "temperature", "--chaos", "30-40:1-2", "--no-progress",
        "--ca-file", ca_file, "--cert-file", sim_cert, "--key-file", sim_key,
        "--tls-server-name", SERVER_NAME, "--manifest", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    sent = m["totals"]["sent"]
    assert sent == m["totals"]["acked"] > 0
    log = broker.log_text()
    assert "u'svc-echo'" in log and "u'sim-fleet'" in log
    # the service consumed what the devices sent and published its echoes over TLS
    wait_until(lambda: "'evt/echo/" in broker.log_text(), 10, "an echo published by the service")
    print(f"[tls sim+service] sent={sent} acked={m['totals']['acked']}")


def test_local_password_file_from_flag_env_and_yaml(tmp_path):
    """--local-password-file (EDGEFERRY_LOCAL_PASSWORD_FILE, local_password_file in YAML):
    checked at start like --password-file, with a user name in --local; a password in
    the --local URL instead is warned about, never shown."""
    pw = tmp_path / "local.pw"
    pw.write_text("local-secret\n")
    os.chmod(pw, 0o600)
    base = ["--cloud", "mqtt://cloud.example", "--node-id", "n"]
    s = gateway_settings(base + ["--local", "mqtt://gateway@127.0.0.1:1884", "--local-password-file", str(pw)], {})
    assert s.local_password_file == str(pw) and s.notes == ()
    s = gateway_settings(base, {"EDGEFERRY_LOCAL": "mqtt://gateway@h:1", "EDGEFERRY_LOCAL_PASSWORD_FILE": str(pw)})
    assert s.local_password_file == str(pw)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"gateway:\n  local: mqtt://gateway@h:1\n  local_password_file: {pw}\n")
    assert gateway_settings(base + ["--config", str(cfg)], {}).local_password_file == str(pw)
    with pytest.raises(ConfigError, match="--local-password-file needs a user name in --local"):
        gateway_settings(base + ["--local-password-file", str(pw)], {})
    os.chmod(pw, 0o640)
    with pytest.raises(ConfigError, match=rf"local password file {pw} is readable by group or others"):
        gateway_settings(base + ["--local", "mqtt://gateway@h:1", "--local-password-file", str(pw)], {})
    s = gateway_settings(base + ["--local", "mqtt://gateway:hunter2@h:1"], {})
    assert any("--local-password-file" in n for n in s.notes) and "hunter2" not in " ".join(s.notes)
