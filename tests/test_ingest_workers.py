"""Several ingest workers on one fleet: MQTT shared subscriptions and a PostgreSQL sink.

Workers are ``ingest run --group G`` processes (as on several hosts) or one
``--workers N`` supervisor. Killing, adding and removing workers under load loses and
duplicates nothing in the database.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

from tests.harness import wait_until
from tests.pipeline import Pipeline
from tests.postgres import pg_url  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(150)
PY = sys.executable


def _exact(r: dict[str, int]) -> None:
    assert (r["lost"], r["duplicated"], r["unexpected"]) == (0, 0, 0), r


def test_workers_killed_added_removed_under_load(tmp_path, broker_factory, proc_factory, chaos, pg_url):  # noqa: F811
    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos, sink=pg_url)

    def worker(name: str):  # noqa: ANN202
        p = proc_factory([PY, "-m", "edgeferry", "ingest", "run", "--cloud", pipe.cloud.url, "--sink", pg_url,
                          "--downlink", "false", "--group", "fleet", "--client-id", name, "--backoff-max", "1s"],
                         name)
        p.wait_for_line(r"ingest connected .* consuming \$share/fleet/ef/\+/up/\+", 20)
        return p

    w1, w2 = worker("w1"), worker("w2")
    pipe.start_gateway()
    pipe.gateway.wait_for_line(r"cloud broker .* connected", 20)
    rate = 2000
    load = pipe.load(rate * 8, rate, "wk", devices=20)

    def stored(n: int):  # noqa: ANN202
        return lambda: pipe.status()["counters"]["stored"] >= n

    wait_until(stored(rate * 2), 20, "load flowing")
    w1.kill9()  # what it took and had not confirmed: back through w1's session or a resend
    wait_until(stored(rate * 3), 20, "load flowing with one worker")
    w3 = worker("w3")  # added
    wait_until(stored(rate * 5), 20, "load flowing with w2 and w3")
    w2.terminate()  # removed
    sent = pipe.wait_sent(load, 60)
    pipe.wait_delivered(sent, 60)
    r = pipe.tally("wk", sent, label="workers: kill -9 one, add one, remove one")
    nacks = sum(w.log_text().count("asking for a resend") for w in (w2, w3))
    print(f"[workers] holes asked for again={nacks} frames uplinked={pipe.status()['counters']['frames']}")
    _exact(r)


def test_frames_a_worker_took_and_never_confirmed_go_to_another(tmp_path, broker_factory, proc_factory, chaos,
                                                                 pg_url):  # noqa: F811
    """w1 takes frames and dies inside its transaction (held on a lock the test takes):
    w2, started after, writes them (the gateway resends what no worker confirmed)."""
    import psycopg

    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos, sink=pg_url)

    def worker(name: str):  # noqa: ANN202
        p = proc_factory([PY, "-m", "edgeferry", "ingest", "run", "--cloud", pipe.cloud.url, "--sink", pg_url,
                          "--downlink", "false", "--group", "fleet", "--client-id", name], name)
        p.wait_for_line(r"ingest connected", 20)
        return p

    w1 = worker("w1")
    pipe.start_gateway()
    with psycopg.connect(pg_url) as lock:
        lock.execute("LOCK TABLE lanes IN ACCESS EXCLUSIVE MODE")  # w1's batch waits on it

        def waiting() -> bool:
            q = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'edgeferry-ingest'"
                 " AND wait_event_type = 'Lock'")
            with psycopg.connect(pg_url) as db:
                return db.execute(q).fetchone()[0] > 0  # type: ignore[index]

        load = pipe.load(3000, 3000, "tk")
        sent = pipe.wait_sent(load, 20)
        wait_until(waiting, 20, "w1 holding frames, its transaction waiting")
        w1.kill9()
        lock.rollback()
    assert pipe.rows() == []
    worker("w2")
    pipe.wait_delivered(sent, 30)
    r = pipe.tally("tk", sent, label="frames taken by a killed worker, written by another")
    _exact(r)
    assert "resending unconfirmed records" in pipe.gateway_log()


def test_workers_supervisor_two_processes(tmp_path, broker_factory, proc_factory, chaos, pg_url):  # noqa: F811
    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos, sink=pg_url)
    sup = proc_factory([PY, "-m", "edgeferry", "ingest", "run", "--cloud", pipe.cloud.url, "--sink", pg_url,
                        "--downlink", "false", "--workers", "2", "--client-id", "sup"], "supervisor")
    wait_until(lambda: sup.log_text().count("consuming $share/sup/ef/+/up/+") >= 2, 20, "two workers connected")
    pipe.start_gateway()
    load = pipe.load(4000, 2000, "sv")
    wait_until(lambda: pipe.status()["counters"]["stored"] >= 1000, 20, "load flowing")
    with open(f"/proc/{sup.pid}/task/{sup.pid}/children") as f:
        child = int(f.read().split()[0])
    os.kill(child, signal.SIGKILL)  # the supervisor starts it again under its client id
    wait_until(lambda: "exited with -9: starting it again" in sup.log_text(), 20, "worker restarted")
    wait_until(lambda: sup.log_text().count("consuming $share/sup/ef/+/up/+") >= 3, 20, "worker back")
    sent = pipe.wait_sent(load, 30)
    pipe.wait_delivered(sent, 30)
    _exact(pipe.tally("sv", sent, label="--workers 2, one killed -9 and restarted"))
    assert sup.terminate() == 0
