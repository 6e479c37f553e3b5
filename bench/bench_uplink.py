"""Uplink benchmark (issue 2): the edgeferry gateway + ingest against Mosquitto's own bridge.

Both pipelines run on this machine in the same run, from the same broker configs
(deploy/mosquitto/edge.conf and cloud.conf, started by edgeferry.procs.Broker exactly as
the tests start them), with the same TCP proxy on the cloud link (the tests' chaos
proxy, firmware_sim.chaos_thread.ThreadedChaosProxy):

    edgeferry: loadgen -> edge mosquitto -> gateway (SQLite) -> proxy -> cloud mosquitto
               -> edgeferry ingest -> JSONL
    bridge:    loadgen -> edge mosquitto (bridge) ----------> proxy -> cloud mosquitto
               -> bench.bridge_sink -> JSONL

Every scenario counts sent / delivered / lost / duplicated at the sink by the message
number ``n`` in each payload, with its own run id.

    .venv/bin/python -m bench --only uplink [--quick]
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from bench._uplink_pipelines import (
    BACKOFF,
    LOGS,
    PIPELINES,
    PROXY,
    RESTART_TIMEOUT,
    VARIANTS,
    Bridge,
    Edgeferry,
    Pipeline,
    bridge_connects,
    bridge_lines,
    export,
    log,
)
from bench._uplink_summary import summary
from bench._util import (
    Loadgen,
    Workdir,
    count_run,
    io_write_bytes,
    mem_kb,
    payload_bytes,
    pid_of,
    run_loadgen,
    run_scenarios,
    terminate_timed,
    wait_until,
)

NAME = "uplink"
__all__ = ["run", "summary"]  # what python -m bench calls


def _count(p: Pipeline, run: str, n: int) -> dict[str, int]:
    c = count_run(p.sink, run, n)
    if c["lost"] or c["duplicated"] or c["stray"]:
        p.flag(f"run {run}: lost {c['lost']}, duplicated {c['duplicated']}")
    return c


def _per100k(cpu0: dict[str, float], cpu1: dict[str, float], n: int) -> dict[str, float]:
    return {k: round((cpu1[k] - cpu0[k]) * 100000 / n, 3) for k in cpu0 if n}


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# ------------------------------------------------------------------ scenarios

def live(n: int, ceiling_n: int, reps: int) -> dict[str, Any]:
    """1 + 6: live throughput and CPU, and the load generator's own ceiling."""
    out: dict[str, Any] = {"messages": n, "size": 100, "devices": 10}
    wd = Workdir("efbench-ceiling-")
    try:
        b = wd.broker("edge", "edge").start()
        ceil = []
        for i in range(reps):
            r = run_loadgen(b.url, ceiling_n, f"ceil{i}")
            ceil.append(r["rate"])
        out["loadgen_ceiling_msg_s"] = ceil
        log(f"loadgen alone: {ceil} msg/s")
    finally:
        wd.cleanup()
    for rep in range(reps):
        # alternate the order, so neither pipeline always runs first
        for kind in (("bridge", "edgeferry") if rep % 2 == 0 else ("edgeferry", "bridge")):
            p = PIPELINES[kind](f"live{rep}")
            try:
                run = f"live-{kind}-{rep}"
                cpu0 = p.cpu()
                lg = Loadgen(p.edge.url, n, run).start()
                w = p.tail.wait(n, timeout=300, quiet=15, busy_pids=p.sink_pids())
                res = lg.result()
                cpu1 = p.cpu()
                c = _count(p, run, n)
                span = (w["last"] - w["first"]) if w["first"] else None
                row = {
                    **c,
                    "sink_rate_msg_s": _r(c["delivered"] / span, 0) if span else None,
                    "end_to_end_s": _r(w["last"] - lg.t_start) if w["last"] else None,
                    "end_to_end_msg_s": _r(c["delivered"] / (w["last"] - lg.t_start), 0)
                    if w["last"] else None,
                    "loadgen_msg_s": res["rate"],
                    "cpu_s_per_100k": _per100k(cpu0, cpu1, c["delivered"]),
                    "forwarder_rss_kb": mem_kb(p.forwarder_pid()),
                }
                out.setdefault(kind, []).append(row)
                log(f"live {kind}: {row}")
            finally:
                p.close()
    return out


def _drain_one(p: Pipeline, run: str, n: int) -> dict[str, Any]:
    """One pipeline's drain: a backlog of n built while the link is cut, then up()."""
    p.cut()
    if isinstance(p, Edgeferry):
        p.wait_links(cloud=False)
    cpu0 = p.cpu()
    lg = run_loadgen(p.edge.url, n, run)
    p.wait_backlog(n)
    cpu1 = p.cpu()
    time.sleep(1.5)  # let reconnect attempts fail a few times: a real outage
    cpu2 = p.cpu()
    tl: list[tuple[Any, ...]] = []
    tl_stop: Callable[[], None] | None = None
    base = 0
    if isinstance(p, Edgeferry):
        base = (p.status() or {"counters": {"uplinked_records": 0}})["counters"][
            "uplinked_records"]
    t_up = time.monotonic()
    if isinstance(p, Edgeferry):
        tl, tl_stop = p.timeline(t_up, 0.1)
    p.up()
    w: dict[str, Any] = p.tail.wait(n, timeout=600, quiet=15, busy_pids=p.sink_pids())
    cpu3 = p.cpu()
    if tl_stop is not None:
        # ingest may write the last records before the gateway counts them as
        # uplinked: sample on until a sample shows all of them (or 10 s)
        try:
            def all_uplinked(tl: list[tuple[Any, ...]] = tl, base: int = base) -> bool:
                return any(up - base >= n for _, up, *_ in tl)
            wait_until(all_uplinked, 10, "the gateway to count every record uplinked", 0.05)
        except AssertionError:
            p.flag("the gateway did not count every record uplinked")
        tl_stop()
    c = _count(p, run, n)
    row = {
        **c,
        "loadgen_msg_s": lg["rate"],
        "reconnect_s": _r(w["first"] - t_up) if w["first"] else None,
        "drain_s": _r(w["last"] - w["first"]) if w["first"] else None,
        "drain_msg_s": _r(c["delivered"] / (w["last"] - w["first"]), 0)
        if w["first"] and w["last"] > w["first"] else None,
        "up_to_last_s": _r(w["last"] - t_up) if w["last"] else None,
        "cpu_s_per_100k_intake": _per100k(cpu0, cpu1, n),
        "cpu_s_per_100k_drain": _per100k(cpu2, cpu3, c["delivered"]),
        "forwarder_peak_rss_kb": mem_kb(p.forwarder_pid())["VmHWM"],
        "sink_peak_rss_kb": mem_kb(p.sink_pids()[0])["VmHWM"],
        "load1": round(os.getloadavg()[0], 2),
    }
    if tl:
        # when the gateway had every record acknowledged by the cloud broker (the
        # rest of the drain is ingest writing its sink), sampled every 0.1 s
        done = [t for t, up, *_ in tl if up - base >= n]
        row["gateway_all_uplinked_s"] = done[0] if done else None
    return row


def drain(n: int) -> dict[str, Any]:
    """2 + 5 (outage) + 6 (drain CPU): a backlog built while the link is cut, then up().

    ``EFBENCH_AB=REF[,REF...]`` (``worktree``: the checkout as it is) runs the drain of
    each ref's gateway and ingest instead, exported (git archive) beside, and the bridge,
    ``EFBENCH_ROUNDS`` rounds (default 3) in a rotating order: an A/B of exported code
    against exported code, in the same run."""
    out: dict[str, Any] = {"messages": n, "gateway_backoff_max": BACKOFF,
                           "bridge_restart_timeout": RESTART_TIMEOUT}
    refs = [r for r in os.environ.get("EFBENCH_AB", "").split(",") if r]
    if not refs:
        for kind in ("bridge", "edgeferry"):
            p = PIPELINES[kind]("drain")
            try:
                out[kind] = row = _drain_one(p, f"drain-{kind}", n)
                log(f"drain {kind}: {row}")
            finally:
                p.close()
        return out
    wd = Workdir("efbench-ab-")
    try:
        srcs = {ref: export(ref, wd / ref.replace("/", "_")) for ref in refs}
        kinds = ["bridge", *(f"edgeferry@{ref}" for ref in refs)]
        rounds = int(os.environ.get("EFBENCH_ROUNDS", "3"))
        out["ab"] = {k: [] for k in kinds}
        for rnd in range(rounds):
            order = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]
            for kind in order:
                ref = kind.partition("@")[2]
                p = Edgeferry("drain", src=srcs[ref]) if ref else Bridge("drain")
                try:
                    row = _drain_one(p, f"drain-{kind}-{rnd}", n)
                    out["ab"][kind].append(row)
                    log(f"drain {kind} round {rnd}: {row}")
                finally:
                    p.close()
        log("drain A/B, per round: " + "; ".join(
            f"{k}: " + " ".join(f"{r['drain_s']}" for r in rows) for k, rows in out["ab"].items()))
    finally:
        wd.cleanup()
    return out


def cold_start(n: int) -> dict[str, Any]:
    """3: messages queued at the local broker for the gateway's session while it was down."""
    p = Edgeferry("cold")
    try:
        run = "cold"
        stopped = terminate_timed(p.gateway)  # None: it did not exit on SIGTERM and was killed
        lg = run_loadgen(p.edge.url, n, run)
        t0 = time.monotonic()
        p.start_gateway(wait=False)
        # how far ahead of the gateway's acknowledgements the broker ran (its window is
        # max_inflight_messages): the largest received - acked_local seen
        ahead = [0]

        def sample() -> None:
            st = p.status()
            if st:
                k = st["counters"]
                ahead[0] = max(ahead[0], k["received"] - k["acked_local"])
        w = p.tail.wait(n, timeout=300, quiet=15, on_first=sample, busy_pids=p.sink_pids())
        c = _count(p, run, n)
        m = mem_kb(p.gateway.pid)
        row = {**c, "messages": n, "loadgen_msg_s": lg["rate"],
               "start_to_first_s": _r(w["first"] - t0) if w["first"] else None,
               "start_to_last_s": _r(w["last"] - t0) if w["last"] else None,
               "gateway_peak_rss_kb": m["VmHWM"], "gateway_rss_after_kb": m["VmRSS"],
               "unacked_at_first_record": ahead[0],
               "gateway_sigterm_exit_s": _r(stopped)}
        log(f"cold start: {row}")
        return row
    finally:
        p.close()


def memory(n: int, steps: int = 4) -> dict[str, Any]:
    """4: RSS holding a backlog of n messages (cut link), sampled at every n/steps."""
    out: dict[str, Any] = {"messages": n}
    chunk = n // steps
    for kind in ("bridge", "edgeferry"):
        p = PIPELINES[kind]("mem")
        try:
            run = f"mem-{kind}"
            p.cut()
            if isinstance(p, Edgeferry):
                p.wait_links(cloud=False)
            pid = p.forwarder_pid()
            samples = [{"backlog": 0, **mem_kb(pid)}]
            rates = []
            for k in range(steps):
                lg = run_loadgen(p.edge.url, chunk, run, start=k * chunk)
                rates.append(lg["rate"])
                p.wait_backlog((k + 1) * chunk)
                s: dict[str, Any] = {"backlog": (k + 1) * chunk, **mem_kb(pid)}
                if isinstance(p, Edgeferry):
                    s["store_file_bytes"] = sum(
                        f.stat().st_size for f in p.wd.path.glob("store.db*") if f.is_file())
                    s["edge_broker_rss_kb"] = mem_kb(pid_of(p.edge))["VmRSS"]
                samples.append(s)
                log(f"memory {kind}: {s}")
            # then restore the link and count what the big backlog delivered
            t_up = time.monotonic()
            tl, tl_stop = p.timeline(t_up, 1.0) if isinstance(p, Edgeferry) else ([], None)
            p.up()
            w = p.tail.wait(chunk * steps, timeout=600, quiet=15, busy_pids=p.sink_pids())
            if tl_stop is not None:
                tl_stop()
            c = _count(p, run, chunk * steps)
            out[kind] = {"samples": samples, "loadgen_msg_s": rates,
                         "who": "gateway process" if kind == "edgeferry"
                         else "edge mosquitto (bridge queue)",
                         "peak_rss_kb_after_drain": mem_kb(pid)["VmHWM"],
                         "sink_peak_rss_kb": mem_kb(p.sink_pids()[0])["VmHWM"],
                         "drain": {**c, "up_to_last_s": _r(w["last"] - t_up)
                                   if w["last"] else None},
                         "drain_timeline": tl}
            log(f"memory {kind}: drained {out[kind]['drain']}")
        finally:
            p.close()
    return out


def kill9(n: int, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, Any]:
    """5: kill -9 the edge side while it holds a backlog; restart; restore the link; count."""
    out: dict[str, Any] = {"messages": n}
    for kind in ("bridge", *(f"edgeferry-{v}" for v in variants)):
        if kind == "bridge":
            p: Pipeline = Bridge("kill")
        else:
            sync, extra = VARIANTS[kind.split("-", 1)[1]]
            p = Edgeferry("kill", sync=sync, extra=extra)
        try:
            run = f"kill-{kind}"
            p.cut()
            if isinstance(p, Edgeferry):
                p.wait_links(cloud=False)
            run_loadgen(p.edge.url, n, run)
            p.wait_backlog(n)
            if isinstance(p, Edgeferry):
                p.gateway.kill9()
                p.edge.kill()
                p.edge.start()
                p.start_gateway()
            else:
                assert isinstance(p, Bridge)
                p.edge.kill()
                p.start_edge(wait_bridge=False)
            mark = bridge_connects(p.cloud)
            t_up = time.monotonic()
            p.up()
            w = p.tail.wait(n, timeout=300, quiet=8, busy_pids=p.sink_pids())
            c = _count(p, run, n)
            row = {**c, "up_to_last_s": _r(w["last"] - t_up) if w["last"] else None}
            if isinstance(p, Bridge):
                # evidence that a zero is a loss, not a bridge that never came back
                connects = bridge_connects(p.cloud)
                row["bridge_reconnected"] = connects > mark
            out[kind] = row
            log(f"kill -9 {kind}: {row}")
        finally:
            p.close()
    return out


def flash(rate: int, seconds: int, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, Any]:
    """7: bytes the gateway writes per payload byte, online and during an outage."""
    n = rate * seconds
    out: dict[str, Any] = {"rate_msg_s": rate, "seconds": seconds, "messages": n}
    for variant in variants:
        sync, extra = VARIANTS[variant]
        p = Edgeferry(f"flash-{sync}", sync=sync, extra=extra)
        try:
            gw = p.gateway.pid
            row: dict[str, Any] = {}
            # online: link up; count until everything reached the sink and was removed
            run = f"flash-{variant}-on"
            pb = payload_bytes(run, n, 100)
            io0, k0 = io_write_bytes(gw), p.commits()
            run_loadgen(p.edge.url, n, run, rate=rate)
            p.tail.wait(n, timeout=120, quiet=10, busy_pids=p.sink_pids())
            wait_until(lambda: p.backlog() == 0, 30, "the store to empty", 0.05)  # noqa: B023
            time.sleep(1.2)  # the next commit carries the last deletes
            io1, k1 = io_write_bytes(gw), p.commits()
            c = _count(p, run, n)
            row["online"] = {"write_bytes": io1 - io0, "payload_bytes": pb,
                             "ratio": _r((io1 - io0) / pb, 2), "commits": k1 - k0,
                             "bytes_per_commit": (io1 - io0) // max(1, k1 - k0),
                             "lost": c["lost"], "duplicated": c["duplicated"],
                             "files_after": p.store_files()}
            # outage: same load with the link cut; count until all of it is in the store
            run = f"flash-{variant}-off"
            pb = payload_bytes(run, n, 100)
            p.cut()
            p.wait_links(cloud=False)
            io0, k0 = io_write_bytes(gw), p.commits()
            run_loadgen(p.edge.url, n, run, rate=rate)
            p.wait_backlog(n)
            time.sleep(1.2)
            io1, k1 = io_write_bytes(gw), p.commits()
            row["outage"] = {"write_bytes": io1 - io0, "payload_bytes": pb,
                             "ratio": _r((io1 - io0) / pb, 2), "commits": k1 - k0,
                             "bytes_per_commit": (io1 - io0) // max(1, k1 - k0),
                             "files_after": p.store_files()}
            out[variant] = row
            log(f"flash {variant}: {row}")
        finally:
            p.close()
    return out


def run(quick: bool) -> dict[str, Any]:
    if quick:
        n, mem_n, reps, flash_s = 20000, 200000, 1, 3
    else:
        n, mem_n, reps, flash_s = 100000, 1000000, 2, 10
    results: dict[str, Any] = {
        "quick": quick,
        "config": {"gateway": f"--backoff-max {BACKOFF} --keepalive 10s (defaults otherwise)",
                   "bridge": bridge_lines(0)[2:], "proxy": PROXY},
    }
    scenarios = [
        ("live", lambda: live(n, n, reps)),
        ("drain", lambda: drain(n)),
        ("cold_start", lambda: cold_start(n)),
        ("kill9", lambda: kill9(n)),
        ("flash", lambda: flash(2000, flash_s)),
        ("memory", lambda: memory(mem_n)),
    ]
    shutil.rmtree(LOGS, ignore_errors=True)  # the logs of the previous run
    results.update(run_scenarios(scenarios, log, os.environ.get("EFBENCH_SCENARIOS")))
    return results
