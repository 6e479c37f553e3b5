"""The fleet's ground truth against a real end-to-end run: simulated devices -> local
Mosquitto -> gateway -> chaos proxy (cut in the middle) -> cloud Mosquitto -> ingest ->
JSONL sink, then ``edgeferry sim verify`` on the manifest and the sink."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import Broker, Proc, wait_until
from tests.test_sim_support import Collector

PY = sys.executable


def _sink_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.endswith(b"\n")]


def _verify(
    proc_factory: Callable[..., Proc], manifest: Path, sink: Path, name: str, *extra: str
) -> tuple[int, str]:
    p = proc_factory(
        [
            PY,
            "-m",
            "edgeferry",
            "sim",
            "verify",
            "--manifest",
            str(manifest),
            "--sink",
            f"jsonl:{sink}",
            *extra,
        ],
        name,
    )
    rc = p.wait(60)
    return rc, p.log_text()

def _site(
    tmp_path: Path,
    broker_factory: Callable[[str], Broker],
    proc_factory: Callable[..., Proc],
    client_id: str,
) -> tuple[Broker, Path, Path]:
    """An edge broker with a gateway carrying ``dt/#`` to a cloud broker and a JSONL
    ingest, all ready: (the edge broker, the sink's path, a manifest path)."""
    edge, cloud = broker_factory("edge"), broker_factory("cloud")
    sink, manifest = tmp_path / "sink.jsonl", tmp_path / "manifest.json"
    ingest = proc_factory(
        [PY, "-m", "edgeferry", "ingest", "run", "--cloud", cloud.url,
         "--sink", f"jsonl:{sink}", "--client-id", client_id],
        "ingest",
    )
    ingest.wait_for_line("ingest ready", 20)
    gateway = proc_factory(
        [PY, "-m", "edgeferry", "gateway", "run", "--local", edge.url, "--cloud", cloud.url,
         "--store", str(tmp_path / "store.db"), "--node-id", "site-1", "--uplink", "dt/#"],
        "gateway",
    )
    gateway.wait_for_line("gateway ready", 20)
    return edge, sink, manifest



async def test_manifest_and_verify_through_the_gateway_with_an_outage(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    proc_factory: Callable[..., Proc],
    chaos: Callable[..., Any],
) -> None:
    edge, cloud = broker_factory("edge"), broker_factory("cloud")
    link = chaos(cloud)
    sink, manifest = tmp_path / "sink.jsonl", tmp_path / "manifest.json"
    ingest = proc_factory(
        [
            PY,
            "-m",
            "edgeferry",
            "ingest",
            "run",
            "--cloud",
            cloud.url,
            "--sink",
            f"jsonl:{sink}",
            "--client-id",
            "ingest-sim",
        ],
        "ingest",
    )
    ingest.wait_for_line("ingest ready", 20)
    gateway = proc_factory(
        [
            PY,
            "-m",
            "edgeferry",
            "gateway",
            "run",
            "--local",
            edge.url,
            "--cloud",
            f"mqtt://127.0.0.1:{link.port}",
            "--store",
            str(tmp_path / "store.db"),
            "--node-id",
            "site-1",
            "--uplink",
            "dt/#",
            "--uplink",
            "evt/#",
            "--uplink",
            "state/#",
            "--backoff-max",
            "1s",
            "--keepalive",
            "3s",
        ],
        "gateway",
    )
    gateway.wait_for_line("gateway ready", 20)
    async with Collector(edge.url, ["dt/#"], "e2e-watch") as watch:
        sim = proc_factory(
            [
                PY,
                "-m",
                "edgeferry",
                "sim",
                "run",
                "--broker",
                edge.url,
                "--devices",
                "8",
                "--interval",
                "0.1",
                "--duration",
                "6",
                "--seed",
                "21",
                "--sensors",
                "temperature,humidity,door",
                "--outbox",
                "10",
                "--fault",
                "drop:only=dev-0002,at=1..1.2,down=1.5",
                "--fault",
                "garbage:only=dev-0003,probability=0.05",
                "--fault",
                "duplicate:only=dev-0004,probability=0.05",
                "--manifest",
                str(manifest),
                "--run-id",
                "e2e-21",
                "--no-progress",
            ],
            "sim",
        )
        await watch.wait(lambda: len(watch.got) >= 100, 20, "100 readings on the local broker")
        wait_until(lambda: len(_sink_rows(sink)) >= 50, 20, "50 rows in the sink")
        link.cut()  # the site's uplink goes down in the middle of the run
        before = len(watch.got)
        await watch.wait(
            lambda: len(watch.got) >= before + 300, 20, "300 readings during the outage"
        )
        during = len(_sink_rows(sink))
        link.up()
        assert sim.wait(60) == 0, sim.log_tail()
    m = json.loads(manifest.read_text())
    tot = m["totals"]
    # everything the local broker acknowledged reaches the sink (telemetry, garbage, replies)
    wait_until(
        lambda: sum(1 for r in _sink_rows(sink) if r["topic"].startswith("dt/")) >= tot["acked"],
        30,
        f"{tot['acked']} telemetry rows in the sink",
    )
    rc, out = _verify(proc_factory, manifest, sink, "verify")
    print(out)
    assert rc == 0 and "OK" in out
    rc, out = _verify(proc_factory, manifest, sink, "verify-json", "--json")
    report = json.loads(out[out.index("{") :])
    t = report["total"]
    print(
        f"sent {t['sent']}, delivered {t['delivered']}, dropped by devices {t['dropped']}, "
        f"lost {t['lost']}, duplicated {t['duplicated']}, garbage {t['garbage']}; "
        f"{during} rows in the sink when the outage ended"
    )
    assert (
        t["lost"] == 0
        and t["sent"] > 800
        and t["delivered"] + t["dropped"] - t["dropped_delivered"] == t["sent"]
    )
    devs = {d["device"]: d for d in report["devices"]}
    assert devs["dev-0002"]["dropped"] > 0, "the dropped device's small outbox overflowed"
    assert devs["dev-0002"]["dropped"] == m["devices"]["dev-0002"]["dropped"]["outbox_full"]
    assert devs["dev-0003"]["garbage"] == m["devices"]["dev-0003"]["garbage_sent"] > 0
    assert devs["dev-0004"]["duplicated"] >= m["devices"]["dev-0004"]["duplicates_sent"] > 0
    assert sum(d["dropped"] for d in report["devices"]) == t["dropped"] == tot["dropped"]

    # the same check must fail when the sink lost something the devices did not count
    rows = _sink_rows(sink)
    victims = [i for i, r in enumerate(rows) if r["topic"] == "dt/dev-0005/temperature"][10:13]
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(
        "".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i not in victims)
    )
    rc, out = _verify(proc_factory, manifest, tampered, "verify-tampered")
    print(out)
    assert rc == 1 and "LOSS" in out and "dev-0005 temperature" in out


async def test_procs_2_writes_one_manifest_that_verify_accepts(
    tmp_path: Path,
    broker_factory: Callable[..., Broker],
    proc_factory: Callable[..., Proc],
) -> None:
    """``sim run --procs 2``: two processes, each half the devices, one merged manifest,
    checked by one ``sim verify`` against what went through the gateway."""
    edge, sink, manifest = _site(tmp_path, broker_factory, proc_factory, "ingest-procs")
    sim = proc_factory(
        [PY, "-m", "edgeferry", "sim", "run", "--broker", edge.url, "--devices", "6",
         "--interval", "0.2", "--duration", "3", "--seed", "5", "--sensors", "temperature",
         "--outbox", "5", "--fault", "drop:only=dev-0003,at=0.5..0.6,down=1.5",
         "--manifest", str(manifest), "--run-id", "procs-5", "--procs", "2",
         "--no-progress", "--stats-every", "1"],
        "sim-procs",
    )
    assert sim.wait(60) == 0, sim.log_tail()
    log = sim.log_text()
    assert "6 devices in 2 processes" in log
    stats = [json.loads(line[6:]) for line in log.splitlines() if line.startswith("stats {")]
    assert stats and all(s["procs"] == 2 for s in stats) and stats[-1]["devices"] == 6
    m = json.loads(manifest.read_text())
    tot = m["totals"]
    assert m["run"] == "procs-5" and m["complete"]
    assert list(m["devices"]) == [f"dev-{i:04d}" for i in range(6)]
    assert tot["sent"] == sum(s["sent"] for d in m["devices"].values()
                              for s in d["streams"].values())
    assert m["devices"]["dev-0003"]["dropped"].get("outbox_full", 0) > 0, "the fault fired"
    assert m["faults_fired"].get("drop") == 1
    wait_until(
        lambda: sum(1 for r in _sink_rows(sink) if r["topic"].startswith("dt/")) >= tot["acked"],
        30,
        f"{tot['acked']} telemetry rows in the sink",
    )
    rc, out = _verify(proc_factory, manifest, sink, "verify-procs", "--json")
    report = json.loads(out[out.index("{") :])
    t = report["total"]
    print(
        f"[procs-2] sent={t['sent']} delivered={t['delivered']} dropped={t['dropped']} "
        f"lost={t['lost']} duplicated={t['duplicated']}"
    )
    assert rc == 0 and t["lost"] == 0 and t["sent"] == tot["sent"] > 60
    assert {d["device"] for d in report["devices"]} == set(m["devices"])
