"""A gateway whose brokers are all mqtt:// runs without OpenSSL (edge/_nossl.py); one with
an mqtts:// broker loads the real ssl module (tests/test_tls.py checks its process too).

The stand-in ssl module refuses every use with one line; it is installed only before
asyncio and uvloop are imported, which is why reading the gateway's settings must not
import asyncio.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.settings import gateway_settings
from tests.harness import openssl_in
from tests.pipeline import Pipeline

pytestmark = pytest.mark.timeout(60)

PY = sys.executable


def _python(code: str) -> str:
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_gateway_without_tls_carries_messages_without_openssl(tmp_path, broker_factory, proc_factory, chaos):
    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos).start()
    load = pipe.load(300, 0, "nossl")
    sent = pipe.wait_sent(load, 30)
    pipe.wait_delivered(sent, 30)
    assert pipe.tally("nossl", sent)["lost"] == 0
    assert pipe.status()["link"] == {"local": "up", "cloud": "up"}
    assert openssl_in(pipe.gateway.pid) == [], "the gateway loaded OpenSSL without TLS"


def test_reading_the_gateway_settings_imports_neither_asyncio_nor_ssl():
    """gateway/main.py decides from the settings whether to load OpenSSL, before asyncio
    (which imports ssl) is imported."""
    out = _python(
        "import sys\n"
        "from edgeferry.__main__ import main\n"
        "import gateway.main\n"
        "from gateway.settings import gateway_settings\n"
        "s = gateway_settings(['--local', 'mqtt://127.0.0.1:1', '--cloud', 'mqtt://127.0.0.1:2',\n"
        "                      '--node-id', 'pi-1', '--store', 'x.db'], environ={})\n"
        "print(s.uses_tls, [m for m in ('asyncio', 'ssl', 'uvloop', 'hashlib') if m in sys.modules])\n")
    assert out.split("\n")[0] == "False []"


@pytest.mark.parametrize(("local", "clouds", "tls"), [
    ("mqtt://127.0.0.1:1", ["mqtt://127.0.0.1:2"], False),
    ("mqtts://127.0.0.1:1", ["mqtt://127.0.0.1:2"], True),
    ("mqtt://127.0.0.1:1", ["mqtt://127.0.0.1:2", "mqtts://127.0.0.1:3"], True),
])
def test_uses_tls_looks_at_every_broker(local, clouds, tls):
    argv = ["--local", local, "--node-id", "pi-1"]
    for url in clouds:
        argv += ["--cloud", url]
    assert gateway_settings(argv, environ={}).uses_tls is tls


def test_the_stand_in_refuses_tls_with_one_line():
    """Whatever asks for TLS through the stand-in (the MQTT client's TLS options, uvloop's
    or asyncio's own TLS, any other name of ssl) gets TLSUnavailable, and OpenSSL stays
    out of the process."""
    out = _python(
        "import socket, sys\n"
        "from edge._nossl import TLSUnavailable, without_ssl\n"
        "assert without_ssl()\n"
        "import asyncio, ssl, uvloop\n"
        "from edge._tls import TLSOptions\n"
        "def refused(f):\n"
        "    try:\n"
        "        f()\n"
        "    except TLSUnavailable as e:\n"
        "        return str(e)\n"
        "    return 'not refused'\n"
        "print(refused(lambda: TLSOptions().context()))\n"
        "print(refused(lambda: ssl.PROTOCOL_TLS_CLIENT))\n"
        "assert not hasattr(ssl, 'HAS_SNI'), 'a probe must answer False'\n"
        "srv = socket.create_server(('127.0.0.1', 0))\n"
        "async def connect():\n"
        "    try:\n"
        "        await asyncio.open_connection('127.0.0.1', srv.getsockname()[1], ssl=True)\n"
        "    except TLSUnavailable as e:\n"
        "        return str(e)\n"
        "    return 'not refused'\n"
        "print(uvloop.run(connect()))\n"
        "print(asyncio.run(connect()))\n"
        "print(sorted(m for m in sys.modules if m in ('_ssl', '_hashlib')))\n")
    lines = out.splitlines()
    assert len(lines) == 5, out
    for line in lines[:4]:
        assert "TLS is not available in this process" in line and "mqtts://" in line, out
    assert "ssl.PROTOCOL_TLS_CLIENT" in lines[1]
    assert lines[4] == "[]"


def test_the_stand_in_is_not_installed_once_asyncio_has_the_real_ssl():
    out = _python(
        "import asyncio, sys\n"
        "from edge._nossl import without_ssl\n"
        "print(without_ssl(), sys.modules['ssl'].__name__, hasattr(sys.modules['ssl'], 'SSLObject'))\n")
    assert out.strip() == "False ssl True"
