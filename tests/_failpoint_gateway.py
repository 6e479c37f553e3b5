"""``edgeferry gateway run`` with a failpoint, for process-level fault tests.

    python -m tests._failpoint_gateway --failpoint NAME:N [gateway run flags...]

Failpoints (N counts commits that stored records):

- ``crash_after_commit:N``: SIGKILL itself right after the Nth commit, before the local
  acknowledgement (the broker must redeliver, the restarted gateway recognise them).
- ``raise_after_commit:N``: the committer task raises :class:`Failpoint` at that instant
  (the process must end with that error, not hang or hide it).

Production code reads no failpoint; this launcher passes them in as
:class:`gateway.state.Hooks`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from gateway.main import run_gateway
from gateway.state import Hooks

log = logging.getLogger("edgeferry.failpoint")


class Failpoint(RuntimeError):
    """The error a ``raise_*`` failpoint injects."""


def hooks_for(spec: str) -> Hooks:
    name, _, count = spec.partition(":")
    left = int(count or "1")

    def after_commit(records: int) -> None:
        nonlocal left
        left -= 1
        if left > 0:
            return
        if name == "crash_after_commit":
            log.warning("failpoint crash_after_commit: killing myself before acknowledging")
            os.kill(os.getpid(), signal.SIGKILL)
        left = 1 << 62  # once
        raise Failpoint(f"failpoint raise_after_commit: {records} records committed, not acknowledged")

    if name not in ("crash_after_commit", "raise_after_commit"):
        raise SystemExit(f"error: unknown failpoint {spec!r}")
    return Hooks(after_commit=after_commit)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--failpoint":
        raise SystemExit("usage: python -m tests._failpoint_gateway --failpoint NAME:N [flags...]")
    return run_gateway(argv[2:], hooks=hooks_for(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
