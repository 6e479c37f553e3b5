"""``edgeferry gateway run`` with a failpoint, for process-level fault tests.

    python -m tests._failpoint_gateway --failpoint NAME[:N] [gateway run flags...]

Failpoints (N counts commits that stored records; 1 when left out):

- ``crash_after_commit:N``: SIGKILL itself right after the Nth commit, before the local
  acknowledgement (the broker must redeliver, the restarted gateway recognise them).
- ``raise_after_commit:N``: the committer task raises :class:`Failpoint` at that instant
  (the process must end with that error, not hang or hide it).
- ``downlink_crash_after_receive``: SIGKILL once the downlink stored new commands, before
  it acknowledged them to the cloud and delivered them.
- ``downlink_no_fast_status``: command statuses go up by the events lane only.

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


def _kill(name: str) -> None:
    log.warning("failpoint %s: killing myself (SIGKILL)", name)
    os.kill(os.getpid(), signal.SIGKILL)


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
        raise Failpoint(f"failpoint raise_after_commit: {records} records committed, not acknowledged")

    if name in ("crash_after_commit", "raise_after_commit"):
        return Hooks(after_commit=after_commit)
    if name == "downlink_crash_after_receive":
        return Hooks(downlink_after_receive=lambda new: _kill(name))
    if name == "downlink_no_fast_status":
        return Hooks(downlink_fast_status=False)
    raise SystemExit(f"error: unknown failpoint {spec!r}")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--failpoint":
        raise SystemExit("usage: python -m tests._failpoint_gateway --failpoint NAME[:N] [flags...]")
    return run_gateway(argv[2:], hooks=hooks_for(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
