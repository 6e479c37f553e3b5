"""Bench plumbing: brokers from the repo configs on free ports, child processes, /proc
readers, and a sink-file tail that counts lines incrementally.

Nothing here asserts a time: the bench measures and reports.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from edgeferry.procs import free_port  # below the ephemeral range, never 1883

__all__ = [
    "REPO", "PY", "Broker", "Proc", "SinkTail", "Workdir", "count_run", "cpu_seconds",
    "Loadgen", "free_port", "io_write_bytes", "machine_info", "mem_kb", "payload_bytes",
    "run_loadgen",
    "wait_for",
]

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
_CLK = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL me when the bench process dies, however it
    dies, so that no broker, gateway or sink outlives a killed bench."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


def wait_for(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``pred`` until it returns something truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ /proc readers

def mem_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # after the ')' the fields start at 3 (state): utime is field 14, stime 15
    return (int(rest[11]) + int(rest[12])) / _CLK


def io_write_bytes(pid: int) -> int:
    """Bytes this process caused to be sent to the storage layer (/proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def machine_info() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mv = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5).stdout
        mosq = mv.splitlines()[0].strip() if mv else "?"
    except (OSError, subprocess.SubprocessError):
        mosq = "?"
    import platform
    import sqlite3

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "mosquitto": mosq,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# ------------------------------------------------------------------ temp dirs and processes

class Workdir:
    """A temp dir that knows every process started in it and cleans up after itself."""

    def __init__(self, prefix: str = "efbench-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        # mosquitto started as root drops to its own user: let it reach its directory
        self.path.chmod(0o755)
        self.procs: list[Proc] = []

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def keep_logs(self, dest: Path) -> Path:
        """Copy the logs and configs (not stores or sinks) to ``dest``, for a post-mortem."""
        dest.mkdir(parents=True, exist_ok=True)
        for f in self.path.rglob("*"):
            if f.is_file() and f.suffix in (".log", ".conf"):
                shutil.copy2(f, dest / f.name)
        return dest

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            p.kill()
        self.procs.clear()
        shutil.rmtree(self.path, ignore_errors=True)


class Proc:
    """A child process with stdout and stderr in one log file."""

    def __init__(self, wd: Workdir, name: str, args: list[str], env: dict[str, str] | None = None):
        self.wd = wd
        self.name = name
        self.args = args
        self.env = env
        self.log = wd / f"{name}.log"
        self.p: subprocess.Popen[bytes] | None = None
        self._log_pos = 0
        wd.procs.append(self)

    def start(self) -> Proc:
        logf = open(self.log, "ab")
        self._log_pos = self.log.stat().st_size
        env = dict(os.environ, **(self.env or {}))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.p = subprocess.Popen(self.args, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                  cwd=str(REPO), preexec_fn=_die_with_parent)
        logf.close()
        return self

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def log_text(self, since_start: bool = True) -> str:
        try:
            with open(self.log, "rb") as f:
                if since_start:
                    f.seek(self._log_pos)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            if needle in self.log_text():
                return True
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.p.returncode if self.p else '?'}) "
                                   f"before {needle!r}:\n{self.log_text()[-2000:]}")
            return False
        wait_for(seen, timeout, what=f"{self.name}: {needle!r}")

    def terminate(self, timeout: float = 10.0) -> float | None:
        """SIGTERM and wait; return the seconds it took to exit, or None when it did not
        exit within ``timeout`` (it is then killed with SIGKILL)."""
        if self.p is None or self.p.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout)
            return time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL this process (by its pid) and reap it."""
        if self.p is not None and self.p.poll() is None:
            try:
                os.kill(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                pass


class Broker:
    """Mosquitto from deploy/mosquitto/<kind>.conf: only the ``listener`` and
    ``persistence_location`` lines are replaced; ``extra`` lines are appended (a bridge)."""

    def __init__(self, wd: Workdir, kind: str, name: str, extra: list[str] | None = None) -> None:
        self.wd = wd
        self.kind = kind
        self.name = name
        self.port = free_port()
        self.dir = wd / name
        self.dir.mkdir()
        if os.geteuid() == 0:
            # as root, mosquitto runs as the "mosquitto" user: give it its persistence dir
            import pwd

            try:
                pw = pwd.getpwnam("mosquitto")
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            except KeyError:
                pass
        lines = []
        for line in (REPO / "deploy" / "mosquitto" / f"{kind}.conf").read_text().splitlines():
            if line.startswith("listener "):
                line = f"listener {self.port} 127.0.0.1"
            elif line.startswith("persistence_location "):
                line = f"persistence_location {self.dir}/"
            lines.append(line)
        lines += extra or []
        self.conf = wd / f"{name}.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = Proc(wd, name, [MOSQUITTO, "-c", str(self.conf)])

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> Broker:
        self.proc.start()

        def listening() -> bool:
            if not self.proc.alive():
                raise RuntimeError(f"mosquitto {self.name} exited:\n{self.proc.log_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return True
            except OSError:
                return False
        wait_for(listening, timeout, what=f"mosquitto {self.name} on port {self.port}")
        return self

    def stop(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()


# ------------------------------------------------------------------ sink files

class SinkTail:
    """Counts the lines of a growing file by reading only what was appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self._f = None

    def poll(self) -> int:
        if self._f is None:
            try:
                self._f = open(self.path, "rb")
            except FileNotFoundError:
                return self.lines
        while True:
            data = self._f.read(1 << 20)
            if not data:
                break
            self.lines += data.count(b"\n")
        return self.lines

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def wait(self, target: int, *, timeout: float, quiet: float = 5.0,
             interval: float = 0.003, on_first=None,
             busy_pids: tuple[int, ...] = ()) -> dict[str, float | int | None]:
        """Wait until ``target`` lines are there, or nothing happened for ``quiet`` seconds,
        or ``timeout``. Something happens when a line is added or when one of
        ``busy_pids`` (the sink writer) is using the CPU: a writer busy with one big batch
        is not a stall. Returns the monotonic times of the first and last new line."""
        base = self.poll()
        t0 = time.monotonic()
        first = last = None
        active = t0
        seen = base
        next_cpu = t0 + 0.5
        cpu = self._cpu(busy_pids)
        while True:
            n = self.poll()
            now = time.monotonic()
            if n > seen:
                if first is None:
                    first = now
                    if on_first is not None:
                        on_first()
                last = active = now
                seen = n
            if n >= target:
                break
            if busy_pids and now >= next_cpu:
                c = self._cpu(busy_pids)
                if c - cpu > 0.1:  # more than 20% of a core over the last half second
                    active = now
                cpu, next_cpu = c, now + 0.5
            if now - active > quiet or now - t0 > timeout:
                break
            time.sleep(interval)
        return {"start": t0, "first": first, "last": last, "lines": n, "new": n - base}

    @staticmethod
    def _cpu(pids: tuple[int, ...]) -> float:
        total = 0.0
        for pid in pids:
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        return total


_N_RE_CACHE: dict[str, re.Pattern[bytes]] = {}


def count_run(path: Path, run: str, sent: int, start: int = 0) -> dict[str, int]:
    """Count a run's messages at a sink file: parse ``n`` out of each payload (the payload
    is JSON text inside the row's JSON string, so its quotes are escaped)."""
    pat = _N_RE_CACHE.get(run)
    if pat is None:
        pat = _N_RE_CACHE[run] = re.compile(
            rb'\\"run\\":\\"' + re.escape(run.encode()) + rb'\\",\\"n\\":(\d+)')
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    c = Counter(int(m) for m in pat.findall(data))
    want = range(start, start + sent)
    delivered = sum(1 for n in want if n in c)
    dup = sum(v - 1 for v in c.values() if v > 1)
    stray = sum(1 for n in c if not start <= n < start + sent)
    return {"sent": sent, "delivered": delivered, "lost": sent - delivered, "duplicated": dup,
            "stray": stray, "rows": sum(c.values())}


# ------------------------------------------------------------------ load

def payload_bytes(run: str, count: int, size: int, start: int = 0) -> int:
    from firmware_sim.loadgen import payload_for

    return sum(len(payload_for(run, n, size)) for n in range(start, start + count))


_SENT = re.compile(r"sent (\d+) in ([\d.]+) s \((\d+) msg/s\)")


class Loadgen:
    """The load generator as a child process: ``start()``, then ``result()`` waits for it
    and returns what it printed (sent, seconds, rate) and its wall-clock bounds."""

    def __init__(self, broker_url: str, count: int, run: str, *, rate: float = 0, size: int = 100,
                 devices: int = 10, start: int = 0, window: int = 1000) -> None:
        self.args = [PY, "-m", "firmware_sim.loadgen", "--broker", broker_url,
                     "--count", str(count), "--size", str(size), "--devices", str(devices),
                     "--run", run, "--start", str(start), "--window", str(window)]
        if rate:
            self.args += ["--rate", str(rate)]
        self.p: subprocess.Popen[str] | None = None
        self.count = count
        self.t_start = 0.0

    def start(self) -> Loadgen:
        self.t_start = time.monotonic()
        self.p = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=str(REPO), preexec_fn=_die_with_parent)
        return self

    def result(self, timeout: float | None = None) -> dict[str, float]:
        if timeout is None:  # generous, but a stuck run ends
            timeout = 60 + self.count / 500
        assert self.p is not None
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        t_end = time.monotonic()
        m = _SENT.search(out)
        if self.p.returncode != 0 or m is None:
            raise RuntimeError(f"loadgen failed ({self.p.returncode}): {out[-500:]} {err[-2000:]}")
        return {"sent": int(m.group(1)), "seconds": float(m.group(2)), "rate": float(m.group(3)),
                "wall": t_end - self.t_start, "t_start": self.t_start, "t_end": t_end}

    def kill(self) -> None:
        if self.p is not None and self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(10)


def run_loadgen(broker_url: str, count: int, run: str, **kw) -> dict[str, float]:
    """Run the load generator to completion."""
    return Loadgen(broker_url, count, run, **kw).start().result()
