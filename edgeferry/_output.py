"""Output of a child process, line by line: a reader thread per process tees each line
into a log file and appends it under a condition variable, so that waiters are woken by
each new line or by the end of output (never a sleep). And how a child is stopped:
a signal, a bounded wait, then SIGKILL. Used by :mod:`edgeferry.procs`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

__all__ = ["Output", "stop_process"]


class Output:
    """Lines of a process's output, collected by a reader thread and teed to a file."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.eof = True
        self._thread: threading.Thread | None = None

    def attach(self, stream: IO[bytes], name: str, banner: str | None = None) -> None:
        self.join(5)  # the previous run's reader, if any, has seen its end of output
        log = open(self.log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        with self.cond:
            self.eof = False
            if banner is not None:
                self.lines.append(banner + "\n")
                log.write(banner + "\n")
        self._thread = threading.Thread(target=self._pump, args=(stream, log),
                                        name=f"output-{name}", daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes], log: IO[str]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                text = raw.decode("utf-8", "replace")
                if not text.endswith("\n"):
                    text += "\n"
                log.write(text)
                with self.cond:
                    self.lines.append(text)
                    self.cond.notify_all()
        finally:
            stream.close()
            log.close()
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, since: int,
                 what: str) -> re.Match[str]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        i = since
        with self.cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m is not None:
                        return m
                    i += 1
                if self.eof:
                    raise AssertionError(
                        f"{what} ended without printing a line matching {rx.pattern!r}; "
                        f"last lines:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no line matching {rx.pattern!r} from {what} within {timeout} s; "
                        f"last lines:\n{self.tail()}")
                self.cond.wait(left)

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def text(self) -> str:
        with self.cond:
            return "".join(self.lines)


def stop_process(popen: subprocess.Popen[bytes], sig: int, timeout: float,
                  group: bool = False) -> int:
    """Send ``sig`` (to the process group if ``group``), wait up to ``timeout``, then
    SIGKILL. Returns the exit status."""
    if popen.poll() is None:
        try:
            if group:
                os.killpg(popen.pid, sig)
            else:
                popen.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            return popen.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(popen.pid, signal.SIGKILL) if group else popen.kill()
            except ProcessLookupError:
                pass
    return popen.wait()
