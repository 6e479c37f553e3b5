"""Real processes for the demo, the benchmarks and the tests: Mosquitto brokers started
from the project's configs, CLI processes, free ports.

- :func:`free_port` a free TCP port on 127.0.0.1, outside the kernel's ephemeral range.
- :class:`Broker` a real Mosquitto started from one of the project's configs, on a free
  port, with its own persistence directory; stop / kill -9 / restart on the same port.
- :class:`Proc` a process whose combined stdout and stderr is teed into a log file and
  can be waited on line by line (:meth:`Proc.wait_for_line`).
- :func:`wait_until` the last resort: poll a condition that has no event to wait on.

Waiting on output never sleeps (:mod:`edgeferry._output`).

The broker configs (:data:`EDGE_CONF`, :data:`CLOUD_CONF`) travel inside the package,
as ``edgeferry/data/mosquitto/*.conf``, so that ``edgeferry demo`` also works from an
installed wheel; ``deploy/mosquitto/`` in the repository holds the same files for people
to read and deploy (tests/test_packaging.py checks that they are the same).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from edgeferry._output import Output, stop_process

__all__ = [
    "CLOUD_CONF",
    "EDGE_CONF",
    "MOSQUITTO",
    "REPO",
    "Broker",
    "Proc",
    "free_port",
    "python_argv",
    "wait_until",
]
# (moved here from tests/harness.py so that `edgeferry demo` and the benchmarks use the
# same broker and process handling as the tests; tests/harness.py re-exports it)

CONF_DIR = Path(__file__).resolve().parent / "data" / "mosquitto"
EDGE_CONF = CONF_DIR / "edge.conf"
CLOUD_CONF = CONF_DIR / "cloud.conf"
# The checkout this module runs from, if it does (tests, benchmarks); in an installed
# wheel this is the site-packages' parent and means nothing.
REPO = Path(__file__).resolve().parent.parent
_CHECKOUT = REPO if (REPO / "pyproject.toml").is_file() else None
MOSQUITTO = os.environ.get("EDGEFERRY_MOSQUITTO") or os.environ.get("EDGEFERRY_TEST_MOSQUITTO") \
    or shutil.which("mosquitto") \
    or "/usr/sbin/mosquitto"

_FORBIDDEN_PORTS = {1883, 8883}
_READY = re.compile(r"mosquitto version \S+ running")


# ---------------------------------------------------------------------------- ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now; never 1883.

    Ports are picked below the kernel's ephemeral range: a port from that range can be
    taken, while a broker is down for a restart, by the source port of a client that is
    reconnecting (Linux even lets such a connect to 127.0.0.1 connect to itself), and the
    broker could then not come back on its port.
    """
    lo, _ = _ephemeral_range()
    rng = random.SystemRandom()
    if lo > 11000:
        for _ in range(200):
            port = rng.randrange(10000, lo)
            if port not in _FORBIDDEN_PORTS and _bindable(port):
                return port
    while True:  # fall back to whatever the kernel gives
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _FORBIDDEN_PORTS:
            return port


_PRCTL: Callable[..., int] | None = None


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when its parent thread ends
    (prctl PR_SET_PDEATHSIG), or None where there is no prctl. prctl is looked up here,
    in the parent: between fork and exec the child calls it and nothing else."""
    global _PRCTL
    if _PRCTL is None:
        try:
            import ctypes

            _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
    prctl = _PRCTL

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG

    return preexec


# ---------------------------------------------------------------------------- broker


class Broker:
    """A real Mosquitto started from a config file (default: :data:`EDGE_CONF`).

    The config is copied into ``workdir`` with its ``listener``, ``persistence_location``,
    ``log_dest`` and ``user`` lines replaced: the broker listens on 127.0.0.1 on a free
    port (kept across restarts), persists into ``workdir/data/``, and logs to stderr
    (which Mosquitto does not buffer; ``log_dest stdout`` into a pipe is block-buffered)
    with ``log_type information`` added, since that is the level of the "running" line
    that tells us it is listening. ``extra`` lines are appended; a key they set replaces
    every line of the original with that key (``extra=["max_queued_messages 10"]``).

    ``die_with_parent=True`` has the kernel SIGKILL the broker when the thread that
    started it ends, however it ends (the benchmarks: no broker outlives a killed run).
    Start it from a thread that lives as long as the broker should.
    """

    def __init__(self, conf: Path | str = EDGE_CONF, workdir: Path | str | None = None, *,
                 port: int | None = None, extra: Iterable[str] = (), name: str | None = None,
                 binary: str = MOSQUITTO, die_with_parent: bool = False) -> None:
        self.source_conf = Path(conf)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(
            tempfile.mkdtemp(prefix="edgeferry-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name or self.source_conf.stem
        self.binary = binary
        self._preexec = _die_with_parent() if die_with_parent else None
        self.extra = [line.strip() for line in extra if line.strip()]
        self.host = "127.0.0.1"
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        if self.port in _FORBIDDEN_PORTS:
            raise ValueError(f"port {self.port} is reserved for real brokers; tests never use it")
        self.data_dir = self.workdir / "data"
        self.conf_path = self.workdir / f"{self.name}.conf"
        self.log_path = self.workdir / f"{self.name}.log"
        self._out = Output(self.log_path)
        self._popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._started_once = False

    # -- config

    def render_config(self) -> str:
        drop = {"listener", "persistence_location", "log_dest", "user", "port", "bind_address"}
        drop |= {line.split()[0] for line in self.extra if not line.startswith("#")}
        lines = [f"# generated by edgeferry/procs.py from {self.source_conf}"]
        for line in self.source_conf.read_text().splitlines():
            words = line.split()
            if words and not words[0].startswith("#") and words[0] in drop:
                lines.append(f"# (replaced) {line}")
            else:
                lines.append(line)
        lines += [
            "",
            "# test harness",
            f"listener {self.port} {self.host}",
            f"persistence_location {self.data_dir}/",
            "log_dest stderr",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root Mosquitto switches to the user "mosquitto", who cannot write here.
            lines.append("user root")
        lines += self.extra
        return "\n".join(lines) + "\n"

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def start(self, timeout: float = 10.0) -> Broker:
        """Start Mosquitto and return once it listens; AssertionError with the log tail
        if it exits or does not get there within ``timeout`` seconds."""
        if self.running:
            raise RuntimeError(f"broker {self.name} is already running")
        for attempt in range(3):
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.conf_path.write_text(self.render_config())
            since = len(self._out.lines)
            self._popen = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.workdir,
                preexec_fn=self._preexec)
            self.starts += 1
            assert self._popen.stdout is not None
            self._out.attach(self._popen.stdout, f"mosquitto-{self.port}",
                             f"=== harness: start #{self.starts} of {self.name} on port "
                             f"{self.port} (pid {self._popen.pid})")
            try:
                self._out.wait_for(_READY, timeout, since, f"mosquitto {self.name}")
                self._started_once = True
                return self
            except AssertionError:
                self._finish(signal.SIGKILL, 5)
                in_use = any("Address already in use" in line
                             for line in self._out.lines[since:])
                # The port was taken between free_port() and now: pick another one, but
                # only before the first successful start (a restart keeps its port).
                if not in_use or self._fixed_port or self._started_once or attempt == 2:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _finish(self, sig: int, timeout: float) -> int | None:
        if self._popen is None:
            return None
        rc = stop_process(self._popen, sig, timeout)
        self._out.join(timeout)
        return rc

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (Mosquitto saves its persistence file on a clean exit)."""
        return self._finish(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL: anything since the last autosave is lost, as on a power cut."""
        return self._finish(signal.SIGKILL, 10)

    def restart(self, hard: bool = False, timeout: float = 10.0) -> Broker:
        """Stop (or kill -9 if ``hard``) and start again, same port, same data."""
        if hard:
            self.kill()
        else:
            self.stop(timeout)
        return self.start(timeout)

    def close(self) -> None:
        """Stop, and remove the working directory if the broker made it."""
        if self.running:
            self.stop(5)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the log

    def log_text(self) -> str:
        return self._out.text()

    def log_tail(self, n: int = 40) -> str:
        with self._out.cond:
            return self._out.tail(n)

    def mark(self) -> int:
        """The current end of the log, for ``wait_for_log(..., since=mark)``."""
        with self._out.cond:
            return len(self._out.lines)

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0,
                     since: int = 0) -> re.Match[str]:
        """Wait for a log line (from line ``since``; all runs) matching ``pattern``,
        e.g. ``r"New client connected .* as gw-1"``."""
        return self._out.wait_for(pattern, timeout, since, f"mosquitto {self.name}")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"Broker({self.name}, {self.url}, {state})"


# ---------------------------------------------------------------------------- processes


class Proc:
    """A command-line process with its combined output teed into ``logdir/<name>.log``.

    ``env`` entries are added to (and override) the current environment; ``cwd`` is
    the checkout when running from one, else the current directory, unless given;
    ``PYTHONUNBUFFERED=1`` is set unless given. The process gets its own session, so
    :meth:`kill9` and teardown also reach any children it started. ``die_with_parent``:
    see :class:`Broker`.
    """

    def __init__(self, args: list[str], name: str, logdir: Path | str,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None, *,
                 die_with_parent: bool = False) -> None:
        self.args = [str(a) for a in args]
        self.name = name
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.logdir / f"{name}.log"
        self.env = dict(env) if env is not None else {}
        self.cwd = Path(cwd) if cwd is not None else _CHECKOUT  # None: the current directory
        self._out = Output(self.log_path)
        self._popen: subprocess.Popen[bytes] | None = None
        self._preexec = _die_with_parent() if die_with_parent else None

    def start(self) -> Proc:
        if self._popen is not None:
            raise RuntimeError(f"process {self.name} was already started; make a new Proc")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env)
        self._popen = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=env, cwd=self.cwd, start_new_session=True,
            preexec_fn=self._preexec)
        assert self._popen.stdout is not None
        self._out.attach(self._popen.stdout, self.name)
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"process {self.name} is not started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal)."""
        return self._popen.poll() if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit by itself; AssertionError with the log tail if not."""
        assert self._popen is not None, f"process {self.name} is not started"
        try:
            rc = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout} s; last lines:\n"
                                 f"{self.log_tail()}") from None
        self._out.join(5)
        return rc

    def kill9(self) -> int:
        """SIGKILL the process (and anything else in its session); return its status."""
        assert self._popen is not None, f"process {self.name} is not started"
        rc = stop_process(self._popen, signal.SIGKILL, 10, group=True)
        self._out.join(5)
        return rc

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit status."""
        assert self._popen is not None, f"process {self.name} is not started"
        rc = stop_process(self._popen, signal.SIGTERM, timeout)
        if self._popen.returncode is not None:
            # anything left in its session goes too
            try:
                os.killpg(self._popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._out.join(5)
        return rc

    def signal(self, sig: int) -> None:
        assert self._popen is not None, f"process {self.name} is not started"
        self._popen.send_signal(sig)

    def mark(self) -> int:
        """The current number of output lines, for ``wait_for_line(..., since=mark)``."""
        with self._out.cond:
            return len(self._out.lines)

    def wait_for_line(self, regex: str | re.Pattern[str], timeout: float = 10.0,
                      since: int = 0) -> re.Match[str]:
        """The first output line from line ``since`` on (default: from the start)
        matching ``regex`` (``re.search``), waiting up to ``timeout`` seconds for it.
        AssertionError with the last lines if it times out, or at once if the process's
        output ends first."""
        return self._out.wait_for(regex, timeout, since, f"process {self.name}")

    @property
    def lines(self) -> list[str]:
        with self._out.cond:
            return list(self._out.lines)

    def log_text(self) -> str:
        return self._out.text()

    def log_tail(self, n: int = 40) -> str:
        with self._out.cond:
            return self._out.tail(n)

    def __enter__(self) -> Proc:
        return self.start() if self._popen is None else self

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.terminate(5)

    def __repr__(self) -> str:
        rc = self.returncode
        state = "not started" if self._popen is None else ("running" if rc is None else f"rc={rc}")
        return f"Proc({self.name}, {state})"


def python_argv(*args: str) -> list[str]:
    """``[sys.executable, *args]``: the interpreter running the tests."""
    return [sys.executable, *args]


# ---------------------------------------------------------------------------- polling


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; AssertionError("timed out waiting for
    <what>") after ``timeout`` seconds. Only for conditions with no event to wait on
    (a count in a file, a counter in a status reply): prefer log lines."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        if predicate():
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {what}")
        pause.wait(min(interval, left))
