"""A three-node NATS cluster with JetStream and an MQTT listener on each node, every
process on its own free ports, MQTT streams replicated three ways (``stream_replicas``).

Each node has the part of the Mosquitto Broker interface the pipeline uses (``host``,
``port``, ``url``, ``start()``, ``stop()``, ``kill()``, ``log_text()``).
"""

from __future__ import annotations

from pathlib import Path

from tests.cloud_brokers import NATS
from tests.harness import Proc, free_port

__all__ = ["NatsCluster", "NatsNode"]


class NatsNode:
    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.host = "127.0.0.1"
        self.port = free_port()  # MQTT
        self.nats_port = free_port()
        self.route_port = free_port()
        self.conf = workdir / "nats.conf"
        self.proc: Proc | None = None
        self._procs: list[Proc] = []

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def configure(self, routes: list[int]) -> None:
        self.conf.write_text(
            f"listen: {self.host}:{self.nats_port}\n"
            f"server_name: {self.name}\n"
            f'jetstream {{ store_dir: "{self.workdir / "js"}" }}\n'
            f"cluster {{ name: edgeferry, listen: {self.host}:{self.route_port}, routes: ["
            + ", ".join(f"nats-route://{self.host}:{p}" for p in routes) + "] }\n"
            f"mqtt {{ listen: {self.host}:{self.port}, stream_replicas: 3 }}\n")

    def start(self, wait: bool = True) -> NatsNode:
        self.proc = Proc([NATS, "-c", str(self.conf)], f"{self.name}-{len(self._procs) + 1}",
                         self.workdir / "logs").start()
        self._procs.append(self.proc)
        if wait:
            self.proc.wait_for_line(r"Server is ready", 30)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.running:
            self.proc.kill9()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.running:
            self.proc.terminate(timeout)

    def log_text(self) -> str:
        return "".join(p.log_text() for p in self._procs)


class NatsCluster:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [NatsNode(workdir / f"n{i + 1}", f"n{i + 1}") for i in range(size)]
        for n in self.nodes:
            n.configure([m.route_port for m in self.nodes if m is not n])

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
