"""``edgeferry demo``: the whole uplink on one machine, with an outage in the middle.

Two Mosquitto brokers (local and "cloud", from deploy/mosquitto/*.conf, on free ports),
the gateway and ingest as their own processes, the cloud link through the chaos proxy,
and a publisher sending numbered messages. Half-way the link is cut for a while; the
gateway keeps storing, then drains when the link returns. At the end the sink is
counted: sent, delivered, lost, duplicated.
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeferry.procs import CLOUD_CONF, EDGE_CONF, Broker, Proc, wait_until

__all__ = ["run_demo"]


def _count(sink: Path, run: str) -> collections.Counter[int]:
    counts: collections.Counter[int] = collections.Counter()
    if not sink.exists():
        return counts
    with open(sink, "rb") as f:
        for line in f:
            try:
                p = json.loads(json.loads(line)["payload"])
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(p, dict) and p.get("run") == run:
                counts[p["n"]] += 1
    return counts


def _status(store: Path) -> dict:
    from gateway.health import query_status

    return query_status(store) or {}


def run_demo(messages: int = 2000, outage: float = 3.0, rate: float = 500.0) -> int:
    from firmware_sim.chaos_thread import ThreadedChaosProxy
    from firmware_sim.loadgen import generate

    out = Console()
    work = Path(tempfile.mkdtemp(prefix="edgeferry-demo-"))
    procs: list[Proc] = []
    brokers: list[Broker] = []
    proxy = None
    run = f"demo{int(time.time())}"
    try:
        out.print("[bold]edgeferry demo[/bold]: local broker -> gateway -> (chaos link) -> cloud broker -> ingest")
        edge = Broker(EDGE_CONF, work / "edge", name="edge").start()
        cloud = Broker(CLOUD_CONF, work / "cloud", name="cloud").start()
        brokers += [edge, cloud]
        proxy = ThreadedChaosProxy(cloud.host, cloud.port).start()
        out.print(f"  local broker {edge.url}, cloud broker {cloud.url}, chaos link :{proxy.port}")
        store, sink = work / "store.db", work / "sink.jsonl"
        py = sys.executable
        ingest = Proc([py, "-m", "edgeferry", "ingest", "run", "--cloud", cloud.url,
                       "--sink", f"jsonl:{sink}", "--client-id", "demo-ingest"], "ingest", work).start()
        procs.append(ingest)
        ingest.wait_for_line("ingest connected", 20)
        gateway = Proc([py, "-m", "edgeferry", "gateway", "run", "--local", edge.url,
                        "--cloud", f"mqtt://127.0.0.1:{proxy.port}", "--store", str(store),
                        "--node-id", "demo-pi", "--backoff-max", "1s", "--keepalive", "5s"],
                       "gateway", work).start()
        procs.append(gateway)
        gateway.wait_for_line(r"cloud broker .* connected", 20)
        gateway.wait_for_line(r"local broker .* connected", 20)
        out.print(f"  gateway and ingest running; publishing {messages} messages at {rate:g}/s")

        async def publish() -> None:
            first = messages // 3
            await generate(edge.url, first, rate=rate, run=run, devices=5)
            proxy.cut()
            out.print(f"  [red]link cut[/red] for {outage:g} s; publishing goes on")
            task = asyncio.create_task(generate(edge.url, messages - first, rate=rate, run=run,
                                                devices=5, start=first))
            await asyncio.sleep(outage)  # the outage's duration (this is the scenario)
            st = _status(store)
            backlog = sum(v["records"] for v in st.get("lanes", {}).values())
            out.print(f"  while down: cloud link {st.get('link', {}).get('cloud')}, backlog {backlog} records")
            proxy.up()
            out.print("  [green]link up[/green]: the gateway drains at once")
            await task

        asyncio.run(publish())
        t0 = time.monotonic()
        wait_until(lambda: len(_count(sink, run)) >= messages, 60, "every message at the sink")
        counts = _count(sink, run)
        delivered = len(set(counts) & set(range(messages)))
        lost = messages - delivered
        dups = sum(v - 1 for v in counts.values() if v > 1)
        table = Table("sent", "delivered", "lost", "duplicated", title="at the sink (ingest JSONL)")
        table.add_row(str(messages), str(delivered), str(lost), str(dups))
        out.print(table)
        st = _status(store)
        out.print(f"  drained {time.monotonic() - t0:.1f} s after the last publish; gateway counters: "
                  f"stored={st.get('counters', {}).get('stored')} frames={st.get('counters', {}).get('frames')}")
        return 0 if lost == 0 and dups == 0 else 1
    except AssertionError as e:
        Console(stderr=True).print(f"[red]demo failed:[/red] {e}")
        return 1
    finally:
        for p in reversed(procs):
            if p.running:
                p.terminate(5)
        if proxy is not None:
            proxy.stop()
        for b in brokers:
            b.close()
        shutil.rmtree(work, ignore_errors=True)
