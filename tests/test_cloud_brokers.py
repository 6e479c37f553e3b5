"""NATS server's MQTT listener (JetStream) and RabbitMQ's MQTT plugin as the cloud broker:
the gateway and ingest through an outage of the cloud link (chaos proxy) and then a
kill -9 of the cloud broker and its restart, with nothing lost and nothing duplicated
at the sink. docs/clouds.md says what these brokers do differently from Mosquitto."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud_brokers import NatsBroker, RabbitNode, nats_missing, rabbit_missing
from tests.harness import wait_until
from tests.pipeline import Pipeline

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitNode]:
    """One RabbitMQ node for the session (it takes about 15 s to start)."""
    why = rabbit_missing()
    if why:
        pytest.skip(why)
    node = RabbitNode()
    try:
        node.start()
        yield node
    finally:
        node.close()


class _Cloud:
    """broker_factory for Pipeline: 'cloud' is the given broker, the rest Mosquitto."""

    def __init__(self, factory: Any, cloud: Any) -> None:
        self.factory, self.cloud = factory, cloud

    def __call__(self, conf: str) -> Any:
        return self.cloud if conf == "cloud" else self.factory(conf)


def _outage_then_kill9(pipe: Pipeline, cloud: Any, label: str) -> None:
    pipe.start()
    # 1. load flowing, the cloud link cut for 3 s in the middle
    load = pipe.load(3000, 600, label)
    wait_until(lambda: pipe.status()["counters"]["stored"] >= 600, 30, "load flowing")
    pipe.proxy.cut()
    wait_until(lambda: pipe.status()["link"]["cloud"] == "down", 15, "cloud link down")
    threading.Event().wait(3.0)  # the outage's length (the scenario, not a sync)
    pipe.proxy.up()
    sent = pipe.wait_sent(load, 60)
    pipe.wait_delivered(sent, 90)
    # 2. kill -9 of the cloud broker while more arrives, then its restart
    load = pipe.load(2000, 500, label, start=sent)
    wait_until(lambda: pipe.status()["counters"]["stored"] >= sent + 500, 30, "second load flowing")
    cloud.kill()
    more = pipe.wait_sent(load, 60)
    cloud.start()
    pipe.wait_delivered(sent + more, 120)
    result = pipe.tally(label, sent + more, label=f"{label}: outage, then kill -9 of the broker")
    assert (result["lost"], result["duplicated"], result["unexpected"], result["out_of_order"]) == (
        0, 0, 0, 0), result


def test_nats_as_the_cloud_broker(tmp_path: Path, broker_factory, proc_factory, chaos):
    why = nats_missing()
    if why:
        pytest.skip(why)
    nats = NatsBroker(tmp_path / "nats").start()
    try:
        pipe = Pipeline(tmp_path, _Cloud(broker_factory, nats), proc_factory, chaos,
                        gateway_args=("--cloud-profile", "nats"))
        _outage_then_kill9(pipe, nats, "nats")
    finally:
        nats.stop()


def test_rabbitmq_as_the_cloud_broker(tmp_path: Path, rabbit: RabbitNode, broker_factory,
                                      proc_factory, chaos):
    pipe = Pipeline(tmp_path, _Cloud(broker_factory, rabbit), proc_factory, chaos,
                    gateway_args=("--cloud-profile", "rabbitmq"))
    _outage_then_kill9(pipe, rabbit, "rabbitmq")
