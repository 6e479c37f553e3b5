"""The uplink's resend timer (``--resend-after``): a frame that a worker of a shared
subscription took and died with, with no worker restarted (so no hello) and nothing after
it (so no nack), reaches the sink through another worker once it has waited that long."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest

from tests.harness import wait_until
from tests.pipeline import Pipeline
from tests.postgres import pg_url  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(60)
PY = sys.executable
RESEND_AFTER = 2.0
# Mosquitto's debug log names the subscriber each frame went to
HANDED = re.compile(r"Sending PUBLISH to (\S+) \(d\d, q1, r0, m\d+, 'ef/pi-1/up/")


def test_a_frame_a_dead_worker_took_is_resent_to_another(tmp_path, broker_factory, proc_factory, chaos,
                                                          pg_url):  # noqa: F811
    def brokers(conf="edge", **kw):  # noqa: ANN001, ANN003, ANN202
        return broker_factory(conf, extra=("log_type debug",)) if conf == "cloud" else broker_factory(conf, **kw)

    pipe = Pipeline(tmp_path, brokers, proc_factory, chaos, sink=pg_url,
                    gateway_args=("--resend-after", f"{RESEND_AFTER}s"))

    def worker(name: str):  # noqa: ANN202
        p = proc_factory([PY, "-m", "edgeferry", "ingest", "run", "--cloud", pipe.cloud.url, "--sink", pg_url,
                          "--downlink", "false", "--group", "fleet", "--client-id", name], name)
        p.wait_for_line(r"ingest connected .* consuming \$share/fleet/", 20)
        return p

    w1, _ = worker("w1"), worker("w2")  # both subscribed before the gateway: no hello reaches it
    pipe.start_gateway()
    pipe.gateway.wait_for_line(r"cloud broker .* connected", 20)
    os.kill(w1.pid, signal.SIGSTOP)  # takes frames from now on and never writes them

    def handed() -> list[str]:
        return HANDED.findall(pipe.cloud.log_text())

    # one message per frame until the broker hands one to w1: the last frame, so no
    # later frame makes a hole that w2 would nack
    sent = 0
    while True:
        before = len(handed())
        pipe.wait_sent(pipe.load(1, 10, "rt", devices=1, start=sent), 10)
        sent += 1
        wait_until(lambda: len(handed()) > before, 10, "the frame handed to a worker")  # noqa: B023
        if handed()[-1] == "w1":
            break
        assert sent < 6, f"the broker never handed a frame to w1: {handed()}"
    taken = time.monotonic()
    w1.kill9()  # clean session: what it took is gone; no worker starts again
    pipe.wait_delivered(sent, RESEND_AFTER * 2 + 6)
    took = time.monotonic() - taken
    r = pipe.tally("rt", sent, label="a frame a killed worker took, no worker restarted")
    resent = pipe.status()["counters"]["resent_unconfirmed"]
    print(f"[resend timer] frames={sent} taken by w1=1 resent_unconfirmed={resent} "
          f"reached the sink {took:.1f} s after w1 took it (--resend-after {RESEND_AFTER:g} s)")
    assert (r["lost"], r["duplicated"], r["unexpected"]) == (0, 0, 0), r
    assert resent >= 1
    assert handed()[-1] == "w2"  # the resend went to the worker still there
    assert "resent 1 frames that ingest had not confirmed" in pipe.gateway_log()
