"""An edge-to-cloud pipeline of real processes for gateway fault tests.

local Mosquitto <- loadgen            (numbered messages, run id)
local Mosquitto -> gateway -> chaos proxy -> cloud Mosquitto -> ingest -> JSONL sink

``tally()`` reads the sink and counts, per run id, sent / delivered / lost / duplicated,
checks that every lane's sequence numbers reach the sink in increasing order, and prints
the counts so that a test log shows what was measured.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from tests.harness import wait_until

PY = sys.executable


class Pipeline:
    def __init__(self, tmp_path: Path, broker_factory: Any, proc_factory: Any, chaos: Any,
                 node: str = "pi-1", gateway_args: tuple[str, ...] = (), sink: str = "jsonl",
                 ingest_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp_path
        self.node = node
        self.edge = broker_factory("edge")
        self.cloud = broker_factory("cloud")
        self.proxy = chaos(self.cloud)
        self.store = tmp_path / "store.db"
        self.sink_path = tmp_path / ("sink.jsonl" if sink == "jsonl" else "sink.db")
        self.sink = f"{sink}:{self.sink_path}"
        if "://" in sink:  # a database (postgresql://...)
            self.sink = sink
        self.ingest_args = list(ingest_args)
        self.gateway_args = list(gateway_args)
        self._procs = proc_factory
        self.gateway: Any = None
        self.ingest: Any = None
        self._gw_runs = 0
        self._ing_runs = 0

    # ------------------------------------------------------------ processes

    def gateway_argv(self, failpoint: str | None = None) -> list[str]:
        """``edgeferry gateway run ...``; with a failpoint, tests/_failpoint_gateway.py."""
        run = ([PY, "-m", "tests._failpoint_gateway", "--failpoint", failpoint] if failpoint
               else [PY, "-m", "edgeferry", "gateway", "run"])
        return [*run, "--local", self.edge.url,
                "--cloud", f"mqtt://127.0.0.1:{self.proxy.port}", "--store", str(self.store),
                "--node-id", self.node, "--backoff-max", "1s", "--keepalive", "3s",
                "--log-level", "info", *self.gateway_args]

    def start_gateway(self, env: dict[str, str] | None = None, wait: bool = True,
                      failpoint: str | None = None) -> Any:
        self._gw_runs += 1
        self.gateway = self._procs(self.gateway_argv(failpoint), f"gateway{self._gw_runs}", env=env)
        if wait:
            self.gateway.wait_for_line(r"gateway ready", 20)
        return self.gateway

    def start_ingest(self) -> Any:
        self._ing_runs += 1
        self.ingest = self._procs([PY, "-m", "edgeferry", "ingest", "run", "--cloud", self.cloud.url,
                                   "--sink", self.sink, "--client-id", "ingest-test", *self.ingest_args],
                                  f"ingest{self._ing_runs}")
        self.ingest.wait_for_line(r"ingest connected", 20)
        return self.ingest

    def start(self) -> Pipeline:
        self.start_ingest()
        self.start_gateway()
        self.gateway.wait_for_line(r"local broker .* connected", 20)
        self.gateway.wait_for_line(r"cloud broker .* connected", 20)
        return self

    def load(self, count: int, rate: float, run: str, devices: int = 10, start: int = 0,
             topic: str = "dt/dev{d}/temp", size: int = 100) -> Any:
        """Start a load generator (a separate process); ``.wait_sent()`` on the result."""
        p = self._procs([PY, "-m", "firmware_sim.loadgen", "--broker", self.edge.url, "--count", str(count),
                         "--rate", str(rate), "--run", run, "--devices", str(devices), "--start", str(start),
                         "--topic", topic, "--size", str(size)], f"load-{run}-{start}")
        return p

    @staticmethod
    def wait_sent(load: Any, timeout: float) -> int:
        m = load.wait_for_line(r"sent (\d+) in", timeout)
        return int(m.group(1))

    # ------------------------------------------------------------ the sink

    def rows(self) -> list[dict[str, Any]]:
        from gateway.sinks import read_sink

        if "://" not in self.sink and not self.sink_path.exists():
            return []
        return read_sink(self.sink)

    def _count_lines(self) -> int:
        if self.sink.startswith("jsonl:"):
            try:
                with open(self.sink_path, "rb") as f:
                    return f.read().count(b"\n")
            except FileNotFoundError:
                return 0
        return len(self.rows())

    def wait_delivered(self, total: int, timeout: float) -> None:
        wait_until(lambda: self._count_lines() >= total, timeout, f"{total} rows at the sink")

    def tally(self, run: str, sent: int, start: int = 0, label: str = "") -> dict[str, int]:
        counts: collections.Counter[int] = collections.Counter()
        last_seq: dict[tuple[str, int, str], int] = {}
        out_of_order = 0
        for r in self.rows():
            key = (r["node"], r["epoch"], r["lane"])
            if r["seq"] <= last_seq.get(key, 0):
                out_of_order += 1
            last_seq[key] = max(last_seq.get(key, 0), r["seq"])
            try:
                p = json.loads(r["payload"])
            except (ValueError, TypeError):
                continue
            if isinstance(p, dict) and p.get("run") == run:
                counts[p["n"]] += 1
        expected = set(range(start, start + sent))
        delivered = len(set(counts) & expected)
        result = {
            "sent": sent,
            "delivered": delivered,
            "lost": len(expected - set(counts)),
            "duplicated": sum(v - 1 for v in counts.values() if v > 1),
            "unexpected": len(set(counts) - expected),
            "out_of_order": out_of_order,
        }
        print(f"[{label or run}] " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        return result

    def status(self) -> dict[str, Any]:
        from gateway.health import query_status

        st = query_status(self.store)
        assert st is not None, "gateway does not answer on its status socket"
        return st

    def gateway_log(self) -> str:
        return "".join(p.log_text() for p in self._all_gateways())

    def _all_gateways(self) -> list[Any]:
        return [self.gateway] if self.gateway is not None else []


def count_in_log(text: str, pattern: str) -> int:
    return len(re.findall(pattern, text))


def env_with(**kv: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(kv)
    return env
