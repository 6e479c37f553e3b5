"""The cloud as a three-node NATS JetStream cluster: the gateway on one node (``--cloud``
given three times), ingest on the others; kill -9 of the gateway's node under load.
Also: ``--cloud`` tried in turn when the first URL does not answer."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.cloud_brokers import nats_missing
from tests.harness import free_port, wait_until
from tests.nats_cluster import NatsCluster
from tests.pipeline import Pipeline
from tests.postgres import pg_url  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(180)
PY = sys.executable


class _Cloud:
    """broker_factory for Pipeline: 'cloud' is the given broker, the rest Mosquitto."""

    def __init__(self, factory: Any, cloud: Any) -> None:
        self.factory, self.cloud = factory, cloud

    def __call__(self, conf: str) -> Any:
        return self.cloud if conf == "cloud" else self.factory(conf)


def _exact(r: dict[str, int]) -> None:
    assert (r["lost"], r["duplicated"], r["unexpected"], r["out_of_order"]) == (0, 0, 0, 0), r


def test_second_cloud_url_when_the_first_does_not_answer(tmp_path, broker_factory, proc_factory, chaos):
    pipe = Pipeline(tmp_path, broker_factory, proc_factory, chaos)
    dead = f"mqtt://127.0.0.1:{free_port()}"
    argv = pipe.gateway_argv()
    i = argv.index("--cloud")
    argv[i:i + 2] = ["--cloud", dead, "--cloud", argv[i + 1]]
    pipe.gateway_argv = lambda failpoint=None: argv  # type: ignore[method-assign]
    pipe.start()
    load = pipe.load(500, 500, "cu")
    sent = pipe.wait_sent(load, 20)
    pipe.wait_delivered(sent, 30)
    _exact(pipe.tally("cu", sent, label="--cloud dead --cloud live"))
    assert dead.rsplit(":", 1)[1] in pipe.gateway_log()  # the first was tried, and failed


def test_nats_cluster_node_of_the_gateway_killed_under_load(tmp_path, broker_factory, proc_factory, chaos,
                                                            pg_url):  # noqa: F811
    why = nats_missing()
    if why:
        pytest.skip(why)
    cluster = NatsCluster(tmp_path / "nats").start()
    n1, n2, n3 = cluster.nodes
    try:
        pipe = Pipeline(tmp_path, _Cloud(broker_factory, n1), proc_factory, chaos, sink=pg_url)
        urls = [n.url for n in cluster.nodes]
        gw = pipe.gateway_argv()
        i = gw.index("--cloud")
        gw[i:i + 2] = [x for u in urls for x in ("--cloud", u)]  # n1 first, then n2, n3
        gw += ["--cloud-profile", "nats"]
        pipe.gateway_argv = lambda failpoint=None: gw  # type: ignore[method-assign]
        # NATS has no MQTT shared subscriptions: the two ingest processes split the lanes
        ingests = []
        for name, lane, order in (("ing-t", "telemetry", [n2, n3, n1]), ("ing-e", "events", [n3, n2, n1])):
            p = proc_factory([PY, "-m", "edgeferry", "ingest", "run", *[x for n in order for x in ("--cloud", n.url)],
                              "--sink", pg_url, "--client-id", name, "--filter", f"ef/+/up/{lane}",
                              "--cloud-profile", "nats", "--backoff-max", "1s"], name)
            p.wait_for_line(r"ingest connected", 30)
            ingests.append(p)
        pipe.start_gateway()
        pipe.gateway.wait_for_line(r"cloud broker .* connected", 30)
        rate = 1000
        load = pipe.load(rate * 8, rate, "nc", topic="dt/dev{d}/temp")
        ev = pipe.load(400, 50, "ne", topic="evt/alarm/dev{d}")

        def stored(n: int):  # noqa: ANN202
            return lambda: pipe.status()["counters"]["stored"] >= n

        wait_until(stored(rate * 3), 30, "load flowing")
        n1.kill()  # the gateway's node
        pipe.gateway.wait_for_line(rf"cloud broker mqtt://127.0.0.1:({n2.port}|{n3.port}) connected", 30)
        sent = pipe.wait_sent(load, 60)
        sent_ev = pipe.wait_sent(ev, 60)
        pipe.wait_delivered(sent + sent_ev, 90)
        _exact(pipe.tally("nc", sent, label="NATS cluster: the gateway's node killed -9 (telemetry)"))
        _exact(pipe.tally("ne", sent_ev, label="NATS cluster: the gateway's node killed -9 (events)"))
    finally:
        cluster.stop()
