"""Ingest at fleet scale: records/s into PostgreSQL with 1, 2 and 4 workers, from frames of
200 and of 10,000 simulated gateways (bench/fleetgen.py: interleaved, some frames
overtaken, some sent twice), beside a per-row consumer (bench/rowconsumer.py: paho-mqtt,
one INSERT per message) in the same run; ingest's memory at 200 and 10,000 nodes; a
worker killed -9 mid-run; ingest's start on a database holding the run; the fleet view
(``ingest status``) at 10,000 nodes.

``python -m bench --only fleet [--quick]``. Needs PostgreSQL on 127.0.0.1:5432 (user
postgres, or EDGEFERRY_BENCH_PG) and Mosquitto; each scenario gets a database and a
cloud broker of its own.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from typing import Any

import psycopg

from bench._util import PY, Workdir, mem_kb

ADMIN = os.environ.get("EDGEFERRY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


class Db:
    def __init__(self) -> None:
        self.name = f"ef_bench_{secrets.token_hex(4)}"
        with psycopg.connect(ADMIN, autocommit=True) as a:
            a.execute(f"CREATE DATABASE {self.name}")
        self.url = ADMIN.rsplit("/", 1)[0] + "/" + self.name

    def one(self, q: str) -> Any:
        with psycopg.connect(self.url) as db:
            row = db.execute(q).fetchone()  # type: ignore[arg-type]
            return row[0] if row else None

    def count(self, table: str = "records") -> int:
        try:
            return int(self.one(f"SELECT count(*) FROM {table}"))
        except psycopg.errors.UndefinedTable:
            return 0

    def drop(self) -> None:
        with psycopg.connect(ADMIN, autocommit=True) as a:
            a.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _wait(cond: Any, timeout: float, what: str, every: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)


def _ingest(wd: Workdir, name: str, cloud: str, db: Db, workers: int) -> Any:
    args = [PY, "-m", "edgeferry", "ingest", "run", "--cloud", cloud, "--sink", db.url, "--downlink", "false",
            "--client-id", name, "--log-level", "warning"]
    if workers > 1:
        args += ["--workers", str(workers)]
    p = wd.proc(name, args).start()
    return p


def _connected(db: Db, workers: int) -> bool:
    q = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'edgeferry-ingest'"
         f" AND datname = '{db.name}'")
    with psycopg.connect(ADMIN) as a:
        return int(a.execute(q).fetchone()[0]) >= workers  # type: ignore[index]


def scenario(nodes: int, per_node: int, records: int, workers: int, *, kill_at: float | None = None,
             startup: bool = False, status: bool = False) -> dict[str, Any]:
    wd = Workdir("efbench-fleet-")
    db = Db()
    out: dict[str, Any] = {"nodes": nodes, "workers": workers, "records_per_frame": records}
    try:
        broker = wd.broker("cloud", "cloud").start()
        ing = _ingest(wd, "ingest", broker.url, db, workers)
        _wait(lambda: _connected(db, workers), 60, "ingest workers connected to the database")
        time.sleep(1.0)  # the MQTT subscriptions follow the database connection at once
        gen = wd.proc("gen", [PY, "-m", "bench.fleetgen", "--broker", broker.url, "--nodes", str(nodes),
                              "--frames", str(per_node), "--records", str(records)]).start()
        gen.wait_for_line(r"^publishing", 300)
        t0 = time.monotonic()
        unique = nodes * per_node * records
        killed = None
        if kill_at is not None:
            _wait(lambda: db.count() >= unique * kill_at, 120, "records written before the kill", 0.05)
            kids = _children(ing.pid)
            if kids:
                os.kill(kids[0], 9)
                killed = kids[0]
        _wait(lambda: db.count() >= unique, 600, f"{unique} records in the database", 0.05)
        elapsed = time.monotonic() - t0
        m = gen.wait_for_line(r"^BENCH (.*)", 60)
        g = json.loads(m.group(1))
        pids = _children(ing.pid) if workers > 1 else [ing.pid]
        rss = [mem_kb(p)["VmRSS"] for p in pids]
        total = db.count()
        distinct = int(db.one("SELECT count(*) FROM (SELECT DISTINCT node, epoch, seq FROM records) d"))
        out.update({
            "messages": g["messages"], "unique_records": unique, "written": total,
            "duplicates": total - distinct, "lost": unique - distinct, "seconds": round(elapsed, 2),
            "records_per_s": round(unique / elapsed), "worker_rss_kb": rss,
            "killed_worker": killed,
        })
        if status:
            t = time.monotonic()
            r = subprocess.run([PY, "-m", "edgeferry", "ingest", "status", "--sink", db.url, "--json",
                                "--limit", str(nodes + 10)], capture_output=True, text=True, timeout=120)
            lanes = json.loads(r.stdout)
            out["status"] = {"lanes": len(lanes), "seconds": round(time.monotonic() - t, 2),
                             "lag_total": sum(ln["lag"] for ln in lanes),
                             "waiting_total": sum(ln["waiting"] for ln in lanes)}
        ing.terminate(20)
        if startup:  # a restart on a database holding the run: ready without reading history
            t = time.monotonic()
            again = _ingest(wd, "ingest-again", broker.url, db, 1)
            _wait(lambda: _connected(db, 1), 60, "ingest started again")
            out["restart_to_connected_s"] = round(time.monotonic() - t, 2)
            again.terminate(20)
        return out
    finally:
        wd.cleanup()
        db.drop()


def per_row(count_nodes: int, per_node: int) -> dict[str, Any]:
    wd = Workdir("efbench-rows-")
    db = Db()
    try:
        broker = wd.broker("cloud", "cloud").start()
        cons = wd.proc("rows", [PY, "-m", "bench.rowconsumer", "--broker", broker.url, "--db", db.url]).start()
        cons.wait_for_line(r"consuming", 30)
        gen = wd.proc("gen", [PY, "-m", "bench.fleetgen", "--broker", broker.url, "--per-row", "--nodes",
                              str(count_nodes), "--frames", str(per_node), "--records", "1"]).start()
        gen.wait_for_line(r"^publishing", 120)
        t0 = time.monotonic()
        unique = count_nodes * per_node
        _wait(lambda: db.count("row_records") >= unique, 600, f"{unique} rows", 0.05)
        elapsed = time.monotonic() - t0
        return {"nodes": count_nodes, "records": unique, "seconds": round(elapsed, 2),
                "records_per_s": round(unique / elapsed), "written": db.count("row_records")}
    finally:
        wd.cleanup()
        db.drop()


def run(quick: bool = False) -> dict[str, Any]:
    scale = 4 if quick else 1
    res: dict[str, Any] = {"per_row": per_row(200, 100 // scale)}
    print("per-row consumer:", res["per_row"], flush=True)
    runs = []
    for nodes, per_node, records in ((200, 10 // (2 if quick else 1), 100), (10_000, 2, 10 // (2 if quick else 1))):
        for workers in (1, 2, 4):
            r = scenario(nodes, per_node, records, workers, startup=(workers == 1 and nodes == 10_000),
                         status=(workers == 1 and nodes == 10_000))
            print("ingest:", r, flush=True)
            runs.append(r)
    res["runs"] = runs
    k = scenario(200, 10 // (2 if quick else 1), 100, 2, kill_at=0.4)
    print("worker killed:", k, flush=True)
    res["worker_killed"] = k
    return res


def summary(res: dict[str, Any]) -> str:
    pr = res["per_row"]["records_per_s"]
    lines = [f"  per-row consumer (paho, one INSERT per message): {pr:,} records/s",
             "  nodes   workers  records/s  x per-row  duplicates  lost  worker RSS (kB)"]
    for r in res["runs"] + [res["worker_killed"]]:
        tag = "  (one killed -9)" if r.get("killed_worker") else ""
        lines.append(f"  {r['nodes']:>6}  {r['workers']:>7}  {r['records_per_s']:>9,}  {r['records_per_s'] / pr:>9.1f}"
                     f"  {r['duplicates']:>10}  {r['lost']:>4}  {r['worker_rss_kb']}{tag}")
    for r in res["runs"]:
        if "status" in r:
            lines.append(f"  ingest status at {r['nodes']} nodes: {r['status']}")
        if "restart_to_connected_s" in r:
            lines.append(f"  ingest restart on that database: connected in {r['restart_to_connected_s']} s")
    return "\n".join(lines)
