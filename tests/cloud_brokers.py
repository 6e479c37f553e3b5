"""NATS server (MQTT listener, JetStream on) and a RabbitMQ node (MQTT plugin) as the
cloud broker, each started here on free ports with its own config and data directory,
each with the part of the Mosquitto Broker interface the pipeline uses: ``host``,
``port``, ``url``, ``start()``, ``stop()``, ``kill()`` (SIGKILL), ``log_text()``.

RabbitMQ (DESIGN.md pitfalls): the node runs as user ``rabbitmq``, so its directory is
made under /tmp (not pytest's 0700 tree) and given to that user; the listeners are set
in its own rabbitmq.conf (the machine's node, if any, keeps 5672/1883); it is up in
about 15 s, so a test session starts one node and shares it; ``rabbitmqctl -n NODE
stop`` ends it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.harness import Proc, free_port

NATS = shutil.which("nats-server") or "/usr/sbin/nats-server"
RABBIT_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBIT_CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


def nats_missing() -> str | None:
    return None if os.path.exists(NATS) else "nats-server is not installed (Debian package nats-server)"


def rabbit_missing() -> str | None:
    if not os.path.exists(RABBIT_SERVER):
        return "rabbitmq-server is not installed (Debian package rabbitmq-server)"
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return "there is no user rabbitmq to run a RabbitMQ node as"
    if os.geteuid() != 0:
        return "starting a RabbitMQ node of our own needs root (it runs as user rabbitmq)"
    return None


class NatsBroker:
    """nats-server with JetStream and an MQTT listener (MQTT 3.1.1 only); a node of a
    cluster adds its routes to the config (tests/nats_cluster.py)."""

    def __init__(self, workdir: Path, name: str = "nats") -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.host = "127.0.0.1"
        self.port = free_port()  # the MQTT listener
        self.nats_port = free_port()
        self.conf = workdir / "nats.conf"
        self.proc: Proc | None = None
        self._procs: list[Proc] = []
        self.configure()

    def configure(self, cluster: str = "", mqtt: str = "") -> None:
        """Write the config: ``cluster`` is a cluster block, ``mqtt`` more MQTT settings."""
        self.conf.write_text(
            f"listen: {self.host}:{self.nats_port}\n"
            f"server_name: {self.name}\n"  # JetStream's MQTT support needs a server name
            f'jetstream {{ store_dir: "{self.workdir / "js"}" }}\n'
            + cluster
            + f"mqtt {{ listen: {self.host}:{self.port}{mqtt} }}\n")

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, wait: bool = True) -> NatsBroker:
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


class RabbitNode:
    """A RabbitMQ node of our own with the MQTT plugin, on free ports."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="edgeferry-rabbit-"))
        os.chmod(self.workdir, 0o755)
        self.host = "127.0.0.1"
        self.port = free_port()  # MQTT
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.node = f"edgeferry-test-{self.port}@localhost"
        (self.workdir / "mnesia").mkdir()
        (self.workdir / "log").mkdir()
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = {self.host}:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}\n"
            "loopback_users = none\n"
            "mqtt.allow_anonymous = true\n")
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.workdir)], check=True)
        self.env = {
            **os.environ,
            "HOME": pwd.getpwnam("rabbitmq").pw_dir,  # the Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
        }
        self.proc: Proc | None = None
        self._procs: list[Proc] = []

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 90.0) -> RabbitNode:
        self.proc = Proc(["runuser", "-u", "rabbitmq", "--", RABBIT_SERVER],
                         f"rabbit{len(self._procs) + 1}", self.workdir / "out", env=self.env,
                         cwd=self.workdir).start()
        self._procs.append(self.proc)
        self.proc.wait_for_line(r"Starting broker\.\.\. completed|Server startup complete", timeout)
        return self

    def kill(self) -> None:
        """SIGKILL the node (runuser and beam share the session Proc kills)."""
        if self.proc is not None and self.proc.running:
            self.proc.kill9()

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.running:
            subprocess.run(["runuser", "-u", "rabbitmq", "--", RABBIT_CTL, "-n", self.node, "stop"],
                           env=self.env, capture_output=True, timeout=timeout)
            self.proc.wait(timeout)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self.proc is not None and self.proc.running:
                self.proc.kill9()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        return "".join(p.log_text() for p in self._procs)
