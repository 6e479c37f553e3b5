"""A site on a Raspberry Pi Zero 2 W's budget: a quarter of one core and 512 MiB.

The site — the local Mosquitto (deploy/mosquitto/edge.conf), the gateway and the
built-in services (aggregator, rules) — runs inside a cgroup (v1) limited to 25 ms of
CPU per 100 ms (``cpu.cfs_quota_us``) and 512 MiB (``memory.limit_in_bytes``). Each
process joins the cgroup before it execs, so everything it allocates is charged there.
Outside it: 50 simulated sensors (``edgeferry sim run``, they are other devices) and the
cloud side (a Mosquitto from cloud.conf and ingest).

Steps of increasing rate (50 sensors, one stream each): each step runs for a while,
then the sensors drain and ``firmware_sim.verify`` counts at the sink. A rate is
*sustained* when nothing is lost, the sensors hold less than one second of unacknowledged
traffic when they stop (the broker keeps up with them) and the sink holds everything
within 3 s after they finish (the gateway keeps up; the check reads the sink every half
second). Per step: CPU
(% of one core, the cgroup's share being 25 %) and peak RSS of each process, and how
often the cgroup was throttled. Then the highest sustained rate runs again with the cloud
link cut for 60 s in the middle (a chaos proxy between the gateway and the cloud
broker): lost messages, and how long the site needs to catch up.

This emulates a budget on a fast x86 core; it is not a Raspberry Pi (memory bandwidth,
flash latency and the ARM core differ). Needs root and cgroup v1 (skips otherwise).

    python -m bench.bench_pibudget [--quick] [--rates 100,200,400,800] [--step 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench._util import PY, Workdir, cpu_seconds, machine_info, mem_kb
from edgeferry.procs import EDGE_CONF, MOSQUITTO, Broker, Proc
from firmware_sim.chaos_thread import ThreadedChaosProxy
from gateway.health import query_status

CG_ROOT = Path("/sys/fs/cgroup")
QUOTA_US, PERIOD_US = 25_000, 100_000
MEMORY = 512 * 1024 * 1024
DEVICES = 50


class Cgroup:
    """A cpu and a memory cgroup (v1) of one name, and a wrapper that joins both, then execs."""

    def __init__(self, name: str, wd: Workdir, quota_us: int = QUOTA_US, memory: int = MEMORY) -> None:
        self.cpu = CG_ROOT / "cpu" / name
        self.mem = CG_ROOT / "memory" / name
        self.cpu.mkdir()
        self.mem.mkdir()
        (self.cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (self.cpu / "cpu.cfs_quota_us").write_text(str(quota_us))
        (self.mem / "memory.limit_in_bytes").write_text(str(memory))
        self.wrapper = wd / "in-cgroup.sh"
        self.wrapper.write_text(
            "#!/bin/sh\n"
            f"echo $$ > {self.cpu}/cgroup.procs\n"
            f"echo $$ > {self.mem}/cgroup.procs\n"
            'exec "$@"\n')
        self.wrapper.chmod(0o755)
        self.mosquitto = wd / "mosquitto-in-cgroup.sh"
        self.mosquitto.write_text(f'#!/bin/sh\nexec {self.wrapper} {MOSQUITTO} "$@"\n')
        self.mosquitto.chmod(0o755)

    def stats(self) -> dict[str, int]:
        cpu = dict(line.split() for line in (self.cpu / "cpu.stat").read_text().splitlines())
        return {"nr_periods": int(cpu.get("nr_periods", 0)), "nr_throttled": int(cpu.get("nr_throttled", 0)),
                "mem_max_usage": int((self.mem / "memory.max_usage_in_bytes").read_text()),
                "oom_kills": _oom_kills(self.mem)}

    def remove(self) -> None:
        for d in (self.cpu, self.mem):
            try:
                d.rmdir()
            except OSError:
                pass


def _oom_kills(mem: Path) -> int:
    for line in (mem / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def _available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (cgroup v1 directories)"
    if not (CG_ROOT / "cpu" / "cpu.cfs_quota_us").exists() or not (CG_ROOT / "memory").is_dir():
        return "no cgroup v1 cpu and memory controllers here"
    return None


def _verify(manifest: Path, sink: Path) -> dict[str, Any]:
    r = subprocess.run([PY, "-m", "edgeferry", "sim", "verify", "--manifest", str(manifest), "--sink",
                        f"jsonl:{sink}", "--json"], capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout)["total"]


def _usage(pids: dict[str, int]) -> dict[str, tuple[float, int]]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = (cpu_seconds(pid), mem_kb(pid).get("VmHWM", 0))
        except OSError:
            out[name] = (0.0, 0)
    return out


class Site:
    def __init__(self, wd: Workdir, cg: Cgroup) -> None:
        self.wd = wd
        self.cloud = wd.broker("cloud", "cloud").start()
        self.proxy = ThreadedChaosProxy(self.cloud.host, self.cloud.port).start()
        self.sink = wd / "sink.jsonl"
        ingest = wd.proc("ingest", [PY, "-m", "edgeferry", "ingest", "run", "--cloud", self.cloud.url,
                                    "--sink", f"jsonl:{self.sink}"]).start()
        ingest.wait_for_line(r"ingest ready", 30)
        self.edge = Broker(EDGE_CONF, wd / "edge", name="edge", binary=str(cg.mosquitto), die_with_parent=True)
        wd._started.append(self.edge)
        self.edge.start(timeout=30)
        run = [str(cg.wrapper), PY, "-m", "edgeferry"]
        self.store = str(wd / "store.db")
        self.gateway = wd.proc("gateway", [*run, "gateway", "run", "--local", self.edge.url, "--cloud",
                                           f"mqtt://127.0.0.1:{self.proxy.port}", "--store", self.store,
                                           "--node-id", "pibudget"]).start()
        self.gateway.wait_for_line(r"gateway ready", 60)
        self.services: dict[str, Proc] = {}
        for name in ("aggregator", "rules"):
            p = wd.proc(name, [*run, "service", "run", f"edge.services.{name}:service", "--broker", self.edge.url,
                               "--state-dir", str(wd / "state"), "--node-id", "pibudget"]).start()
            p.wait_for_line(rf"service {name} ready", 60)
            self.services[name] = p

    @property
    def pids(self) -> dict[str, int]:
        assert self.edge.pid is not None
        return {"mosquitto": self.edge.pid, "gateway": self.gateway.pid,
                **{n: p.pid for n, p in self.services.items()}}

    def fleet(self, tag: str, rate: float, seconds: float) -> tuple[Proc, Path]:
        manifest = self.wd / f"manifest-{tag}.json"
        p = self.wd.proc(f"sim-{tag}", [PY, "-m", "edgeferry", "sim", "run", "--broker", self.edge.url,
                                        "--devices", str(DEVICES), "--interval", f"{DEVICES / rate:.6f}",
                                        "--duration", str(seconds), "--sensors", "temperature", "--seed", "3",
                                        "--outbox", "1000000", "--no-progress", "--drain-timeout", "600",
                                        "--stats-every", "1",
                                        "--run-id", f"pibudget-{tag}", "--manifest", str(manifest)]).start()
        return p, manifest


def _step(site: Site, cg: Cgroup, tag: str, rate: float, seconds: float,
          outage: tuple[float, float] | None = None) -> dict[str, Any]:
    before, cg0, t0 = _usage(site.pids), cg.stats(), time.monotonic()
    sim, manifest = site.fleet(tag, rate, seconds)
    outage_end = None
    caught_up = None
    if outage is not None:
        at, length = outage
        while time.monotonic() - t0 < at:
            time.sleep(0.05)  # a bench schedules its faults on the clock
        site.proxy.cut()
        while time.monotonic() - t0 < at + length:
            time.sleep(0.05)
        site.proxy.up()
        outage_end = time.monotonic()
        # caught up: the gateway's store is back to what it holds in steady state (a
        # record stays until ingest confirmed it); polled over its status socket
        baseline = max(1, int(rate * 0.5))
        while time.monotonic() - outage_end < 600:
            st = query_status(site.store) or {}
            backlog = sum(int(lane["records"]) for lane in st.get("lanes", {}).values())
            if st and backlog <= baseline:
                caught_up = time.monotonic() - outage_end
                break
            time.sleep(0.25)  # a bench samples the status
    sim.wait(seconds + 900)
    sent_end = time.monotonic()
    deadline = sent_end + 900
    while True:  # until the sink holds every message the sensors were acknowledged
        total = _verify(manifest, site.sink)
        if total["lost"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # a bench polls the sink; verify reads the whole file
    last = time.monotonic()
    wall = last - t0
    after, cg1 = _usage(site.pids), cg.stats()
    stats = [json.loads(line[6:]) for line in sim.log_text().splitlines() if line.startswith("stats {")]
    during = [x for x in stats if x["t"] <= seconds + 0.5]
    end = during[-1] if during else {"t": 0, "acked": 0, "held": 0}
    mid = next((x for x in during if x["t"] >= min(3.0, seconds / 4)), None)
    res: dict[str, Any] = {
        "rate_msg_s": rate, "seconds": seconds, "sent": total["sent"], "delivered": total["delivered"],
        "lost": total["lost"], "dropped_by_devices": total["dropped"], "duplicated": total["duplicated"],
        "acked_msg_s": round((end["acked"] - mid["acked"]) / max(0.1, end["t"] - mid["t"]), 1) if mid else None,
        "held_by_sensors_at_end": end.get("held", 0),
        "sensors_drain_s": round(max(0.0, sent_end - t0 - seconds), 2),
        "sink_after_sensors_s": round(max(0.0, last - sent_end), 2),
        "cpu_pct_one_core": {n: round(100 * (after[n][0] - before[n][0]) / wall, 1) for n in after},
        "peak_rss_mib": {n: round(after[n][1] / 1024, 1) for n in after},
        "site_cpu_pct_one_core": round(100 * sum(after[n][0] - before[n][0] for n in after) / wall, 1),
        "throttled_pct_of_periods": round(100 * (cg1["nr_throttled"] - cg0["nr_throttled"])
                                          / max(1, cg1["nr_periods"] - cg0["nr_periods"]), 1),
        "cgroup_peak_mib": round(cg1["mem_max_usage"] / 2**20, 1),
        "oom_kills": cg1["oom_kills"],
    }
    if outage_end is not None:
        res["caught_up_after_outage_s"] = round(caught_up, 1) if caught_up is not None else None
    # kept up: at the end the sensors held less than a second of traffic the broker had not
    # acknowledged, and the sink had everything within 3 s after they finished
    res["sustained"] = (res["lost"] == 0 and res["dropped_by_devices"] == 0 and res["held_by_sensors_at_end"] < rate
                        and res["sink_after_sensors_s"] <= 3.0)
    return res


def run(quick: bool, rates: list[float] | None = None, step: float | None = None) -> dict[str, Any]:
    why = _available()
    if why is not None:
        return {"skipped": why}
    rates = rates or ([200, 800] if quick else [200, 400, 800, 1600, 3200])
    step = step or (10.0 if quick else 20.0)
    wd = Workdir("efbench-pibudget-")
    cg = Cgroup(f"edgeferry-pibudget-{os.getpid()}", wd)
    try:
        site = Site(wd, cg)
        steps = []
        for rate in rates:
            s = _step(site, cg, f"r{int(rate)}", rate, step)
            steps.append(s)
            if not s["sustained"]:
                break
        best = max((s["rate_msg_s"] for s in steps if s["sustained"]), default=None)
        outage = None
        if best is not None:
            length = 30.0 if quick else 60.0
            outage = _step(site, cg, "outage", best, length * 2.5, outage=(length * 0.5, length))
            outage["outage_s"] = length
        return {
            "command": "python -m bench.bench_pibudget" + (" --quick" if quick else ""),
            "machine": machine_info(),
            "budget": {"cpu_quota_pct_one_core": 100 * QUOTA_US / PERIOD_US, "memory_mib": MEMORY // 2**20,
                       "devices": DEVICES},
            "highest_sustained_msg_s": best,
            "steps": steps,
            "outage": outage,
        }
    except Exception:
        wd.keep_logs(Path("bench/results/logs/pibudget"))
        raise
    finally:
        wd.cleanup()
        cg.remove()


def summary(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"  skipped: {res['skipped']}"
    lines = [f"  budget: {res['budget']['cpu_quota_pct_one_core']:.0f}% of one core, {res['budget']['memory_mib']} MiB;"
             f" highest sustained rate with zero loss: {res['highest_sustained_msg_s']} msg/s"]
    lines.append(f"  {'msg/s':>6} {'acked/s':>7} {'held':>6} {'lost':>5} {'sink s':>6} {'site CPU%':>9} "
                 f"{'throttled%':>10} {'cgroup MiB':>10} ok  per process CPU% / peak RSS MiB")
    for s in [*res["steps"], *([res["outage"]] if res.get("outage") else [])]:
        per = ", ".join(f"{n} {s['cpu_pct_one_core'][n]}/{s['peak_rss_mib'][n]}" for n in s["cpu_pct_one_core"])
        extra = f"  (cloud cut {s['outage_s']:.0f} s: caught up {s['caught_up_after_outage_s']} s after)" \
            if "outage_s" in s else ""
        ok = "y" if s["sustained"] else "n"
        lines.append(f"  {s['rate_msg_s']:>6} {s['acked_msg_s']!s:>7} {s['held_by_sensors_at_end']:>6} {s['lost']:>5} "
                     f"{s['sink_after_sensors_s']:>6} {s['site_cpu_pct_one_core']:>9} "
                     f"{s['throttled_pct_of_periods']:>10} {s['cgroup_peak_mib']:>10} {ok:>2}  {per}{extra}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rates", help="comma-separated msg/s, e.g. 100,200,400")
    p.add_argument("--step", type=float, help="seconds per step")
    a = p.parse_args()
    rates = [float(x) for x in a.rates.split(",")] if a.rates else None
    res = run(a.quick, rates, a.step)
    print(json.dumps(res, indent=2))
    print(summary(res))


if __name__ == "__main__":
    main()
