"""Tests of the test harness itself: Mosquitto fixture, chaos proxy, process helpers.

MQTT is spoken with a few hand-built MQTT 3.1.1 packets over plain sockets, so these
tests depend on nothing but the harness. The only fixed waits are the windows in which
something must *not* happen (a blackholed request gets no answer within 0.5 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware_sim.chaos import ChaosProxy, parse_flap_spec, run_chaos_cli
from firmware_sim.chaos_thread import ThreadedChaosProxy
from tests.harness import Broker, Proc, free_port, wait_until

PY = sys.executable



@pytest.fixture(autouse=True)
def no_asyncio_errors(caplog):
    """The proxy must not make asyncio log errors (e.g. for cancelled connection tasks)."""
    yield
    errors = [r for r in caplog.get_records("call") + caplog.get_records("teardown")
              if r.name.startswith("asyncio") and r.levelno >= logging.WARNING]
    assert not errors, [r.getMessage() for r in errors]


# ---------------------------------------------------------------------- raw MQTT 3.1.1


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


def connect_packet(client_id: str, clean: bool = True, keepalive: int = 60) -> bytes:
    return _packet(0x10, _s("MQTT") + bytes([4, 0x02 if clean else 0x00])
                   + struct.pack("!H", keepalive) + _s(client_id))


def publish_packet(topic: str, payload: bytes, retain: bool = False) -> bytes:
    return _packet(0x30 | (0x01 if retain else 0), _s(topic) + payload)


def subscribe_packet(pid: int, topic: str) -> bytes:
    return _packet(0x82, struct.pack("!H", pid) + _s(topic) + b"\x00")


PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
CONNACK_OK = b"\x20\x02\x00\x00"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_packet(sock: socket.socket) -> tuple[int, bytes]:
    first = recv_exact(sock, 1)[0]
    length, shift = 0, 0
    while True:
        b = recv_exact(sock, 1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, recv_exact(sock, length)


def mqtt_session(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(connect_packet(client_id))
    assert recv_exact(sock, 4) == CONNACK_OK
    return sock


def subscribe(sock: socket.socket, topic: str, pid: int = 1) -> None:
    sock.sendall(subscribe_packet(pid, topic))
    first, body = recv_packet(sock)
    assert first == 0x90 and body[:2] == struct.pack("!H", pid), (first, body)


def next_publish(sock: socket.socket) -> tuple[str, bytes, bool]:
    first, body = recv_packet(sock)
    assert first & 0xF0 == 0x30, f"expected PUBLISH, got {first:#x}"
    (tlen,) = struct.unpack("!H", body[:2])
    return body[2:2 + tlen].decode(), body[2 + tlen:], bool(first & 0x01)


def publish_retained_and_confirm(port: int, topic: str, payload: bytes) -> None:
    """Retain ``payload`` on ``topic``; return once the broker has it stored (it sends
    the retained message back to a subscription made afterwards)."""
    with mqtt_session(port, "harness-retain") as sock:
        sock.sendall(publish_packet(topic, payload, retain=True))
        subscribe(sock, topic)
        assert next_publish(sock) == (topic, payload, True)


# ---------------------------------------------------------------------- ports and brokers


def test_free_port_is_free_and_never_1883():
    ports = {free_port() for _ in range(50)}
    assert 1883 not in ports
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in ports:
        assert port < lo, f"{port} is in the ephemeral range"
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("conf", ["edge", "cloud"])
def test_broker_runs_repo_config_and_speaks_mqtt(broker_factory, conf):
    broker = broker_factory(conf)
    assert broker.port != 1883 and broker.url == f"mqtt://127.0.0.1:{broker.port}"
    active = [ln for ln in broker.conf_path.read_text().splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]
    assert f"listener {broker.port} 127.0.0.1" in active
    assert not any("1883" in ln or "8883" in ln or "/var/lib" in ln for ln in active)
    assert "max_packet_size" in broker.conf_path.read_text()  # the repo's own settings
    with mqtt_session(broker.port, f"harness-{conf}"):
        broker.wait_for_log(rf"New client connected from 127\.0\.0\.1:\d+ as harness-{conf}", 5)


def test_broker_start_fails_fast_with_log_tail(tmp_path):
    broker = Broker(extra=["no_such_option 1"], workdir=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="no_such_option|Unknown configuration"):
        broker.start(timeout=10)
    assert time.monotonic() - t0 < 5
    assert not broker.running


def test_restart_keeps_port_and_persisted_state(broker_factory):
    broker = broker_factory("edge")
    port, pid = broker.port, broker.pid
    publish_retained_and_confirm(port, "harness/kept", b"v1")
    broker.restart()
    assert broker.port == port and broker.pid != pid and broker.running
    assert "Saving in-memory database" in broker.log_text()
    with mqtt_session(port, "harness-after") as sock:
        subscribe(sock, "harness/kept")
        assert next_publish(sock) == ("harness/kept", b"v1", True)


def test_hard_restart_loses_what_was_not_autosaved(broker_factory):
    broker = broker_factory("edge", extra=["autosave_interval 3600"])
    publish_retained_and_confirm(broker.port, "harness/lost", b"v1")
    broker.restart(hard=True)
    assert broker.returncode is None and broker.starts == 2
    with mqtt_session(broker.port, "harness-after") as sock:
        subscribe(sock, "harness/lost")
        # a marker published now comes first only if no retained message was delivered
        sock.sendall(publish_packet("harness/lost", b"marker"))
        assert next_publish(sock) == ("harness/lost", b"marker", False)


def test_kill_makes_connections_fail_and_start_brings_it_back(edge_broker):
    with mqtt_session(edge_broker.port, "harness-victim") as sock:
        assert edge_broker.kill() == -9
        assert sock.recv(1) == b""  # the kernel closed the dead broker's sockets
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", edge_broker.port), timeout=5).close()
    edge_broker.start()
    with mqtt_session(edge_broker.port, "harness-back"):
        pass


# ---------------------------------------------------------------------- the chaos proxy


class Echo:
    """A TCP echo server that records what it saw."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self.closed = 0
        self.server: asyncio.AbstractServer | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self.closed += 1
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    e.server = await asyncio.start_server(e._serve, "127.0.0.1", 0)
    async with e.server:
        yield e


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def open_via(proxy: ChaosProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def test_proxy_forwards_both_ways_in_order(echo):
    async with ChaosProxy("127.0.0.1", echo.port) as p:
        assert p.port not in (0, echo.port, 1883)
        r, w = await open_via(p)
        assert await roundtrip(r, w, b"hello") == b"hello"
        blob = bytes(range(256)) * 4096  # 1 MiB: more than the proxy buffers

        async def send() -> None:
            for i in range(0, len(blob), 10000):
                w.write(blob[i:i + 10000])
                await w.drain()

        sender = asyncio.create_task(send())
        back = await asyncio.wait_for(r.readexactly(len(blob)), 10)
        await sender
        assert back == blob
        assert p.bytes_up == p.bytes_down == len(blob) + 5
        assert p.connections_accepted == 1 and echo.connections == 1
        await close(w)


async def test_cut_closes_current_connections_and_refuses_new_ones(echo):
    async with ChaosProxy("127.0.0.1", echo.port) as p:
        r, w = await open_via(p)
        assert await roundtrip(r, w, b"x") == b"x"
        await p.cut()
        assert p.cuts == 1 and p.active_connections == 0
        assert await asyncio.wait_for(r.read(), 5) == b""  # EOF at the client
        assert echo.closed == 1  # and the target's side is closed too
        r2, w2 = await open_via(p)  # accepted, then closed at once
        assert await asyncio.wait_for(r2.read(), 5) == b""
        assert p.connections_rejected == 1 and echo.connections == 1
        await p.up()
        r3, w3 = await open_via(p)
        assert await roundtrip(r3, w3, b"back") == b"back"
        assert p.cuts == 1 and p.transitions[-2:][0][1] == "link down (cut)"
        for wr in (w, w2, w3):
            await close(wr)


async def test_cut_with_reset_sends_rst(echo):
    async with ChaosProxy("127.0.0.1", echo.port) as p:
        r, w = await open_via(p)
        assert await roundtrip(r, w, b"x") == b"x"
        await p.cut(reset=True)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 5)
        await close(w)


async def test_blackhole_keeps_sockets_open_but_passes_nothing(echo):
    async with ChaosProxy("127.0.0.1", echo.port) as p:
        r1, w1 = await open_via(p)  # will send into the blackhole
        r2, w2 = await open_via(p)  # stays idle through it
        r3, w3 = await open_via(p)  # closes during it
        for r, w in ((r1, w1), (r2, w2), (r3, w3)):
            assert await roundtrip(r, w, b"hi") == b"hi"
        seen = len(echo.received)
        await p.blackhole()
        r4, w4 = await open_via(p)  # a new connection is accepted, and hangs too
        w1.write(b"ping")
        w4.write(b"hello?")
        w3.close()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r1.read(100), 0.5)
        assert not r1.at_eof() and not r4.at_eof() and not w1.is_closing()
        assert len(echo.received) == seen  # nothing reached the target
        assert echo.closed == 0  # not even the close
        assert echo.connections == 3  # nor the new connection
        assert p.bytes_dropped == len(b"ping") + len(b"hello?")
        assert p.active_connections == 4

        await p.up()
        # connections that lost bytes (or a close) are reset when the link comes back
        for r in (r1, r4):
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 5)
        assert await roundtrip(r2, w2, b"still here") == b"still here"
        r5, w5 = await open_via(p)
        assert await roundtrip(r5, w5, b"new") == b"new"
        for w in (w1, w2, w3, w4, w5):
            await close(w)


async def test_delay_adds_latency_in_both_directions_and_keeps_order(echo):
    async with ChaosProxy("127.0.0.1", echo.port) as p:
        r, w = await open_via(p)
        await p.delay(0.15)
        t0 = time.monotonic()
        assert await roundtrip(r, w, b"slow") == b"slow"
        assert time.monotonic() - t0 >= 0.3
        parts = [f"<{i}>".encode() for i in range(50)]
        for part in parts:
            w.write(part)
            await w.drain()
        assert await asyncio.wait_for(r.readexactly(len(b"".join(parts))), 5) == b"".join(parts)
        await p.up()
        t0 = time.monotonic()
        assert await roundtrip(r, w, b"fast") == b"fast"
        assert time.monotonic() - t0 < 0.15
        await close(w)


async def _flap_run(seed: int, n: int, mode: str = "cut") -> ChaosProxy:
    seen: list[str] = []
    enough = asyncio.Event()

    def on_change(text: str) -> None:
        seen.append(text)
        if len(seen) >= n:
            enough.set()

    async with ChaosProxy("127.0.0.1", free_port(), seed=seed, on_change=on_change) as p:
        await p.flap(up=(0.02, 0.06), down=(0.02, 0.06), mode=mode)
        assert p.flapping
        await asyncio.wait_for(enough.wait(), 10)
        await p.up()
        assert not p.flapping
    return p


@pytest.mark.parametrize("mode", ["cut", "blackhole"])
async def test_flap_toggles_with_seeded_durations(mode):
    a, b, c = await asyncio.gather(_flap_run(7, 8, mode), _flap_run(7, 8, mode),
                                   _flap_run(8, 8, mode))
    texts = [t for _, t in a.transitions]
    assert texts[:8] == ["link up", f"link down ({mode})"] * 4
    assert a.cuts == (len([t for t in texts if t == "link down (cut)"]))
    if mode == "cut":
        assert a.cuts >= 4
    # the same seed draws the same schedule; another seed does not
    assert a.flap_durations[:8] == b.flap_durations[:8]
    assert a.flap_durations[:8] != c.flap_durations[:8]
    assert all(0.02 <= d <= 0.06 for _, d in a.flap_durations)
    # each period lasted at least what was drawn (but the last, ended by up())
    times = [at for at, _ in a.transitions]
    assert len(times) == len(a.flap_durations) + 1
    for (state, d), start, end in zip(a.flap_durations[:-1], times[:-2], times[1:-1], strict=True):
        assert end - start >= d - 0.002, (state, d, end - start)


def test_flap_spec_parsing():
    assert parse_flap_spec("1-3:0.5-2") == ((1.0, 3.0), (0.5, 2.0))
    assert parse_flap_spec("2:1") == ((2.0, 2.0), (1.0, 1.0))
    for bad in ("1-3", "3-1:1-2", "a-b:1-2"):
        with pytest.raises(ValueError):
            parse_flap_spec(bad)


async def test_run_chaos_cli_prints_state_changes(echo):
    lines: list[str] = []
    stop = asyncio.Event()

    def out(line: str) -> None:
        lines.append(line)
        if sum(1 for ln in lines if ln.startswith("link down")) >= 2:
            stop.set()

    await asyncio.wait_for(run_chaos_cli(0, f"127.0.0.1:{echo.port}", "0.01-0.02:0.01-0.02",
                                         seed=3, out=out, stop=stop), 10)
    assert lines[0].startswith("chaos proxy listening on 127.0.0.1:")
    assert lines[1:5] == ["link up", "link down (cut)", "link up", "link down (cut)"]
    with pytest.raises(ValueError):
        await run_chaos_cli(0, "no-port", None, stop=stop)


# ---------------------------------------------------------------------- threaded proxy + broker


def test_threaded_proxy_in_front_of_a_broker(edge_broker, chaos):
    proxy = chaos(edge_broker)
    sock = mqtt_session(proxy.port, "harness-via-proxy")
    sock.sendall(PINGREQ)
    assert recv_exact(sock, 2) == PINGRESP

    proxy.cut()  # returns once the connections are closed
    assert sock.recv(1) == b""
    sock.close()
    edge_broker.wait_for_log(r"harness-via-proxy closed its connection|"
                             r"harness-via-proxy disconnected", 5)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        assert s.recv(1) == b""  # refused while cut

    proxy.up()
    with mqtt_session(proxy.port, "harness-again") as sock:
        proxy.blackhole()
        sock.sendall(PINGREQ)
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(2)
    proxy.up()
    with mqtt_session(proxy.port, "harness-third"):
        pass
    assert proxy.cuts == 1 and proxy.connections_accepted == 4 and proxy.bytes_dropped == 2


def test_threaded_proxy_flap_and_stop():
    changes: list[str] = []
    done = threading.Event()

    def on_change(text: str) -> None:
        changes.append(text)
        if len(changes) >= 6:
            done.set()

    with ThreadedChaosProxy("127.0.0.1", free_port(), seed=1, on_change=on_change) as proxy:
        port = proxy.port
        proxy.flap(up=(0.01, 0.03), down=(0.01, 0.03))
        assert done.wait(10)
        proxy.up()
        assert proxy.cuts >= 3 and proxy.mode == "pass"
    with pytest.raises(ConnectionRefusedError):  # stopped: no longer listening
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# ---------------------------------------------------------------------- processes


def test_proc_wait_for_line_and_kill9(proc_factory):
    p = proc_factory([PY, "-c", "import sys, threading\n"
                      "print('ready 42')\n"
                      "print('oops', file=sys.stderr)\n"
                      "threading.Event().wait(60)\n"], "sleeper")
    assert p.wait_for_line(r"ready (\d+)", 10).group(1) == "42"
    mark = p.mark()
    assert p.wait_for_line(r"oops", 10)  # stderr is in the same stream
    assert p.running and p.pid > 0
    assert p.kill9() == -9 and p.returncode == -9 and not p.running
    assert "ready 42" in p.log_text() and "ready 42" in p.log_path.read_text()
    with pytest.raises(AssertionError, match="ended without"):
        p.wait_for_line(r"ready", 10, since=mark)


def test_wait_for_line_fails_at_once_when_output_ends(proc_factory):
    p = proc_factory([PY, "-c", "print('bye'); raise SystemExit(3)"], "quitter")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"ended without .*\n.*bye"):
        p.wait_for_line(r"never printed", 30)
    assert time.monotonic() - t0 < 10
    assert p.wait(10) == 3


def test_wait_for_line_times_out(proc_factory):
    p = proc_factory([PY, "-c", "import threading; print('up'); threading.Event().wait(60)"])
    p.wait_for_line("up", 10)
    with pytest.raises(AssertionError, match="within 0.3 s"):
        p.wait_for_line("never printed", 0.3)


def test_terminate_escalates_to_sigkill(proc_factory):
    stubborn = proc_factory([PY, "-c", "import signal, threading\n"
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                             "print('ignoring SIGTERM')\n"
                             "threading.Event().wait(60)\n"], "stubborn")
    polite = proc_factory([PY, "-c", "import threading\n"
                           "print('ready')\n"
                           "threading.Event().wait(60)\n"], "polite")
    stubborn.wait_for_line("ignoring SIGTERM", 10)
    polite.wait_for_line("ready", 10)
    assert stubborn.terminate(timeout=0.5) == -9
    assert polite.terminate(timeout=10) == -15


def test_proc_env_is_added_to_the_environment(tmp_path):
    with Proc([PY, "-c", "import os; print(os.environ['EF_X'], 'PATH' in os.environ)"],
              "env", tmp_path, env={"EF_X": "hello"}) as p:
        assert p.wait_for_line(r"hello True", 10)
        assert p.wait(10) == 0


def test_wait_until():
    calls = []
    wait_until(lambda: calls.append(1) or len(calls) >= 3, 5, "three calls")
    assert len(calls) == 3
    with pytest.raises(AssertionError, match="timed out waiting for the impossible"):
        wait_until(lambda: False, 0.1, "the impossible")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_die_with_parent_leaves_no_broker_or_child_behind(proc_factory, tmp_path):
    """die_with_parent (the benchmarks use it): when the process that started a broker and
    a child is killed with SIGKILL (only it, not its process group), both go too."""
    code = ("import threading\n"
            "from edgeferry.procs import Broker, Proc, python_argv\n"
            f"b = Broker(workdir={str(tmp_path / 'b')!r}, die_with_parent=True).start()\n"
            "p = Proc(python_argv('-c', 'import threading; threading.Event().wait(120)'),\n"
            f"         'child', {str(tmp_path)!r}, die_with_parent=True).start()\n"
            "print('PIDS', b.pid, p.pid, flush=True)\n"
            "threading.Event().wait(120)\n")
    parent = proc_factory([PY, "-c", code], "parent")
    pids = [int(x) for x in parent.wait_for_line(r"PIDS (\d+) (\d+)", 20).groups()]
    try:
        assert all(_alive(pid) for pid in pids)
        parent.signal(9)
        assert parent.wait(10) == -9
        wait_until(lambda: not any(_alive(pid) for pid in pids), 10,
                   "the broker and the child to die with their parent")
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)
