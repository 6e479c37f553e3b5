"""A three-node NATS cluster with JetStream and an MQTT listener on each node, every
process on its own free ports, MQTT streams replicated three ways (``stream_replicas``).

Each node has the part of the Mosquitto Broker interface the pipeline uses (``host``,
``port``, ``url``, ``start()``, ``stop()``, ``kill()``, ``log_text()``).
"""

from __future__ import annotations

from pathlib import Path

from tests.cloud_brokers import NatsBroker
from tests.harness import free_port

__all__ = ["NatsCluster", "NatsNode"]


class NatsNode(NatsBroker):
    """A node: its routes to the others go into its config once every node has its ports."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.route_port = free_port()
        super().__init__(workdir, name)

    def route_to(self, routes: list[int]) -> None:
        self.configure(
            f"cluster {{ name: edgeferry, listen: {self.host}:{self.route_port}, routes: ["
            + ", ".join(f"nats-route://{self.host}:{p}" for p in routes) + "] }\n",
            mqtt=", stream_replicas: 3")


class NatsCluster:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [NatsNode(workdir / f"n{i + 1}", f"n{i + 1}") for i in range(size)]
        for n in self.nodes:
            n.route_to([m.route_port for m in self.nodes if m is not n])

    def start(self) -> NatsCluster:
        for n in self.nodes:
            n.start(wait=False)
        for n in self.nodes:
            assert n.proc is not None
            n.proc.wait_for_line(r"Server is ready", 30)
        for n in self.nodes:  # JetStream's meta group has a leader: the cluster takes streams
            assert n.proc is not None
            n.proc.wait_for_line(r"JetStream cluster new metadata leader|Self is new JetStream cluster "
                                 r"metadata leader", 30)
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
