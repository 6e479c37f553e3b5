"""``edgeferry demo`` end to end: a short run through an outage with its verification
and report (opened in headless Chromium), the live dashboard in tmux with ``status`` and
``top`` against the running site, and Ctrl-C leaving nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.harness import Proc, wait_until

PY = sys.executable
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TMUX = shutil.which("tmux")


def _demo(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="140")
    return subprocess.run([PY, "-m", "edgeferry", "demo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the decompressed scanlines of a PNG (enough to see it is not blank)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    return w, h, zlib.decompress(idat)


@pytest.mark.timeout(240)
def test_short_demo_loses_nothing_applies_the_command_once_and_writes_a_report(tmp_path: Path):
    data = tmp_path / "data"
    report = tmp_path / "r.html"
    r = _demo("--devices", "10", "--duration", "20", "--outage-at", "5", "--outage-for", "5",
              "--no-dashboard", "--report", str(report), "--data", str(data))
    out = r.stdout
    print(out[-3000:], r.stderr[-2000:])
    assert r.returncode == 0, out + r.stderr
    m = re.search(r"\[demo\] sent=(\d+) delivered=(\d+) lost=(\d+) duplicated=(\d+)", out)
    assert m, "no verification line"
    sent, delivered, lost, dups = map(int, m.groups())
    assert sent > 500 and delivered == sent and lost == 0 and dups == 0
    print(f"[demo] sent={sent} delivered={delivered} lost={lost} duplicated={dups}")
    for check in ("nothing lost", "nothing duplicated", "command applied once, after the outage",
                  "desired state applied and reported"):
        assert f"OK   {check}" in out
    # the view saw traffic at the site and to the cloud (the gateway's counters it reads)
    rates = re.findall(r"local ([\d,]+)/s · uplink ([\d,]+)/s", out)
    assert any(int(a.replace(",", "")) > 0 for a, _ in rates), rates
    assert any(int(b.replace(",", "")) > 0 for _, b in rates), rates
    peak = re.search(r"backlog drained [\d.]+ s after the link came back \(([\d,]+) records at the peak\)", out)
    assert peak and int(peak.group(1).replace(",", "")) > 100, "no backlog seen during the outage"
    # the command reached the site only after the link came back, and ran once
    cut, back = out.index("cloud link cut"), out.index("cloud link back")
    assert cut < out.index("cmd send set_interval") < back < out.index("dev-0000: succeeded")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["devices"]["dev-0000"]["commands_applied"] == 1
    assert manifest["devices"]["dev-0000"]["interval"] == 2.0
    assert manifest["devices"]["dev-0001"]["interval"] == 3.0
    db = sqlite3.connect(data / "cloud.db")
    states = db.execute("SELECT state FROM commands").fetchall()
    db.close()
    assert states == [("succeeded",)]

    page = report.read_text()
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make test installs the Debian package as root)")
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*argv, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=60).stdout
    charts = re.findall(r'<svg[^>]*class="chart[^"]*".*?</svg>', dom, re.S)
    assert len(charts) >= 5, f"{len(charts)} charts in the rendered page"
    for svg in charts:
        drawn = re.findall(r'class="series"[^>]*?(?:points="([^"]+)"|width="([\d.]+)")', svg)
        assert drawn, "a chart with nothing drawn"
        assert any((p and len(p.split()) > 5) or (w and float(w) > 1) for p, w in drawn)
    shot = tmp_path / "report.png"
    subprocess.run([*argv, "--window-size=1000,1900", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=60, check=True)
    w, h, pixels = _png_pixels(shot.read_bytes())
    assert (w, h) == (1000, 1900)
    assert len(set(pixels)) > 50, "the screenshot is blank"


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=10).stdout


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
@pytest.mark.timeout(180)
def test_dashboard_in_tmux_shows_the_outage_and_the_drain_and_top_quits_on_q(tmp_path: Path):
    data = tmp_path / "data"
    session, top_session = f"efdemo{os.getpid()}", f"eftop{os.getpid()}"
    log = tmp_path / "demo.out"
    # the size rich sees: a tmux server started from a test passes on LINES=24 COLUMNS=80
    cmd = (f"env LINES=60 COLUMNS=130 {PY} -m edgeferry demo --devices 5 --duration 18 --outage-at 5 "
           f"--outage-for 8 --data {data}; echo EXIT=$? > {log}; sleep 60")
    _tmux("new-session", "-d", "-s", session, "-x", "130", "-y", "60", cmd)
    try:
        def pane(name: str = session) -> str:
            return _tmux("capture-pane", "-p", "-J", "-t", name)

        try:
            wait_until(lambda: re.search(r"devices online\s+5/5", pane()), 60, "the dashboard")
        except AssertionError:
            print(pane())
            raise
        site = re.search(r"edgeferry top --local (\S+) --store (\S+)", pane())
        assert site, pane()
        local, store = site.groups()
        _tmux("new-session", "-d", "-s", top_session, "-x", "130", "-y", "50",
              f"env LINES=24 COLUMNS=80 {PY} -m edgeferry top --local {local} --store {store}; "
              "echo TOP-EXIT=$?; sleep 30")
        st = subprocess.run([PY, "-m", "edgeferry", "status", "--local", local, "--store", store, "--json"],
                            capture_output=True, text=True, timeout=30)
        assert st.returncode == 0, st.stdout + st.stderr
        snap = json.loads(st.stdout)
        assert snap["gateway"] and snap["devices"]["online"] == 5
        assert snap["link"]["for_s"] is not None, snap["link"]  # time in its state, in one look
        assert {s["name"] for s in snap["services"]} >= {"aggregator", "rules"}
        assert set(snap["lanes"]) == {"events", "telemetry"}
        wait_until(lambda: "CLOUD LINK DOWN" in pane(), 40, "the outage on the dashboard")
        down = pane()
        assert re.search(r"offline for \d", down), down
        wait_until(lambda: "CLOUD LINK DOWN" in pane(top_session), 30, "the outage in edgeferry top")
        assert "backlog  events" in pane(top_session)  # 80x24: one line per subject
        _tmux("send-keys", "-t", top_session, "q")
        wait_until(lambda: "TOP-EXIT=0" in pane(top_session), 15, "edgeferry top to quit on q")
        wait_until(lambda: "backlog drained" in pane(), 40, "the drain on the dashboard")
        wait_until(lambda: log.exists(), 90, "the end of the demo")
        print(pane()[-2500:])
        assert log.read_text().strip() == "EXIT=0"
        assert "OK   nothing lost" in pane()
    finally:
        _tmux("kill-session", "-t", session)
        _tmux("kill-session", "-t", top_session)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_process_and_removes_the_temporary_data(tmp_path: Path):
    demo = Proc([PY, "-m", "edgeferry", "demo", "--devices", "5", "--duration", "60", "--no-dashboard"],
                "demo", tmp_path).start()
    try:
        m = demo.wait_for_line(r"data in (\S+)", 30)
        data = Path(m.group(1))
        demo.wait_for_line(r"devices started", 60)
        pids = _descendants(demo.pid)
        names = {Path(f"/proc/{p}/exe").resolve().name for p in pids if _alive(p)}
        assert len(pids) >= 7 and "mosquitto" in names, names  # 2 brokers, 5 processes of ours
        demo.signal(signal.SIGINT)
        rc = demo.wait(60)
    finally:
        if demo.running:
            demo.kill9()
    assert rc == 130, demo.log_tail()
    left = [p for p in pids if _alive(p)]
    assert not left, f"still running after Ctrl-C: {left}"
    assert not data.exists(), f"{data} was left behind"
    assert "interrupted: every process stopped" in demo.log_text()
