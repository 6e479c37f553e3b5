"""Bench plumbing: a work directory whose brokers and processes are those of
:mod:`edgeferry.procs` (the tests' harness, the same broker configs), /proc readers, the
load generator as a child, and a sink-file tail that counts lines incrementally.

Nothing here asserts a time: the bench measures and reports.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from edgeferry.procs import CLOUD_CONF, EDGE_CONF, MOSQUITTO, REPO, Broker, Proc, wait_until

__all__ = [
    "PY", "REPO", "Loadgen", "SinkTail", "Workdir", "count_run", "cpu_seconds",
    "io_write_bytes", "machine_info", "mem_kb", "payload_bytes", "run_loadgen",
    "pid_of", "terminate_timed", "wait_line", "wait_until",
]

PY = sys.executable
CONFS = {"edge": EDGE_CONF, "cloud": CLOUD_CONF}
_CLK = os.sysconf("SC_CLK_TCK")


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
    """A temp dir that knows every broker and process started in it and cleans up after
    itself. Brokers and processes are those of :mod:`edgeferry.procs`, as in the tests,
    started so that the kernel kills them if the bench dies (``die_with_parent``)."""

    def __init__(self, prefix: str = "efbench-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.path.chmod(0o755)
        self._started: list[Broker | Proc] = []

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def broker(self, kind: str, name: str, extra: Iterable[str] = ()) -> Broker:
        """Mosquitto from the project's ``kind`` config ("edge" or "cloud"), exactly as
        the tests start it (edgeferry.procs.Broker), in ``<workdir>/<name>/``; not started."""
        b = Broker(CONFS[kind], self.path / name, name=name, extra=extra, die_with_parent=True)
        self._started.append(b)
        return b

    def proc(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        """A child process logging to ``<workdir>/<name>.log``; not started. A process is
        started once: to restart one, make a new one with the same name (same log).

        With ``PYTHONPATH`` in ``env`` (another ref's code exported beside, for an A/B) the
        process runs from that directory: from the checkout, ``python -m`` would put the
        checkout first on ``sys.path`` and run this tree's code instead."""
        cwd = env["PYTHONPATH"].split(os.pathsep)[0] if env and env.get("PYTHONPATH") else None
        p = Proc(args, name, self.path, env=env, cwd=cwd, die_with_parent=True)
        self._started.append(p)
        return p

    def keep_logs(self, dest: Path) -> Path:
        """Copy the logs and configs (not stores or sinks) to ``dest``, for a post-mortem."""
        dest.mkdir(parents=True, exist_ok=True)
        for f in self.path.rglob("*"):
            if f.is_file() and f.suffix in (".log", ".conf"):
                shutil.copy2(f, dest / f.name)
        return dest

    def cleanup(self) -> None:
        for x in reversed(self._started):
            if isinstance(x, Broker):
                x.kill()
            elif x.running:
                x.kill9()
        self._started.clear()
        shutil.rmtree(self.path, ignore_errors=True)


def run_scenarios(scenarios: Iterable[tuple[str, Callable[[], dict[str, Any]]]], log: Callable[[str], None],
                  only: str | None = None) -> dict[str, Any]:
    """Run each (name, fn) in turn, timed (``elapsed_s``); a failed scenario is reported as
    its error and the others still run. ``only``: the comma-separated names to run."""
    res: dict[str, Any] = {}
    for name, fn in scenarios:
        if only and name not in only.split(","):
            continue
        t0 = time.monotonic()
        log(f"scenario {name} ...")
        try:
            res[name] = fn()
        except Exception as e:  # a failed scenario is reported, the others still run
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"scenario {name} FAILED: {e}")
        res[name]["elapsed_s"] = round(time.monotonic() - t0, 1)
    return res


def pid_of(broker: Broker) -> int:
    """The pid of a running broker (for /proc readers)."""
    pid = broker.pid
    if pid is None:
        raise RuntimeError(f"broker {broker.name} is not running")
    return pid


def wait_line(proc: Proc, text: str, timeout: float = 20.0) -> None:
    """Wait for an output line of ``proc`` containing ``text`` (its output ending first,
    or ``timeout``, raises AssertionError with the last lines)."""
    proc.wait_for_line(re.escape(text), timeout)


def terminate_timed(proc: Proc, timeout: float = 10.0) -> float | None:
    """SIGTERM and wait: the seconds it took to exit, or None when it did not exit
    within ``timeout`` and was killed."""
    t0 = time.monotonic()
    rc = proc.terminate(timeout)
    return None if rc == -signal.SIGKILL else time.monotonic() - t0


# ------------------------------------------------------------------ sink files

class SinkTail:
    """Counts the lines of a growing file by reading only what was appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self._f: IO[bytes] | None = None

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
        # a one-shot child that ends by itself (a bounded count), or when its broker, which
        # dies with the bench, goes away
        self.p = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=str(REPO), start_new_session=True)
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
