"""Test-only launcher: ``python tests/failpoint_service.py N MODULE:ATTR [flags]`` runs a
service like ``edgeferry service run MODULE:ATTR [flags]``, but kills the process
(SIGKILL) right after its Nth dedup commit, before those messages are acknowledged.

Production code reads no failpoints: this passes the crash in as the service's
``after_commit`` hook."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from edge._launch import load_target
from edge._runner import run_service


def crash_after_commit(n: int) -> Callable[[int], None]:
    left = n

    def after_commit(marks: int) -> None:
        nonlocal left
        left -= 1
        if left <= 0:
            logging.getLogger("edge.service").warning(
                "failpoint service_crash_after_commit: killing myself before acknowledging"
            )
            os.kill(os.getpid(), signal.SIGKILL)

    return after_commit


def main(argv: list[str]) -> int:
    n, spec, rest = int(argv[0]), argv[1], argv[2:]
    svc = load_target(spec)
    svc.after_commit = crash_after_commit(n)
    return run_service(svc, rest, prog=f"failpoint_service {spec}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
