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
from tests.harness import free_port, wait_until
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

    def gateway_argv(self) -> list[str]:
        return [PY, "-m", "edgeferry", "gateway", "run", "--local", self.edge.url,
                "--cloud", f"mqtts://gw@127.0.0.1:{self.proxy.port}", "--store", str(self.store),
                "--node-id", self.node, "--backoff-max", "0.5s", "--keepalive", "3s",
                "--password-file", str(self.d / "gw.pass"), "--metrics-port", str(self.metrics_port),
                "--log-level", "info", *self.tls_args("gw")]

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
    d = tls_dir(tmp_path)
    ca = CA()
    ca.issue("localhost", server=True, names=("127.0.0.1",)).write(
        d / "s.pem", d / "s.key", key_mode=0o644)
    tls = broker_factory("cloud", extra=[f"certfile {d / 's.pem'}", f"keyfile {d / 's.key'}"])
    c = MQTTClient(f"mqtts://127.0.0.1:{tls.port}", "x", connect_timeout=3)
    with pytest.raises(ConnectError) as e:
        await c.connect()
    assert explain(e.value)[0] == "tls_unknown_ca", e.value
    c = MQTTClient(f"mqtts://127.0.0.1:{tls.port}", "x", connect_timeout=3,
                   tls=TLSOptions(ca.write_ca(d / "ca.pem")))
    await c.connect()
    await c.close()
