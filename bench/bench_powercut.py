"""What a power cut of a site loses: kill -9 of the local broker and the gateway together,
at random instants under load, counted at the sink.

The site: a local Mosquitto (deploy/mosquitto/edge.conf, persistence on) and the gateway
(its SQLite store), fed by a simulated fleet (``edgeferry sim run``; the sensors have
their own power: they keep their unacknowledged messages and resend them). The cloud
side (a Mosquitto from cloud.conf and ingest writing a JSONL sink) stays up. At random
instants both site processes get SIGKILL within a millisecond of each other, then
restart from their files. The gateway's session is in the broker's snapshot before the
first cut (a save is forced once it has subscribed), as on a site that has run for a
while: a broker restarted without it would drop what devices publish until the gateway
subscribes again. At the end every device drains its outbox, the gateway drains its
store, and ``firmware_sim.verify`` compares what each device was acknowledged with what
ingest stored: *lost* messages are ones the local broker had acknowledged.

Variants: edge.conf as it is (the broker saves its state every ``autosave_interval`` 30 s),
``autosave_on_changes`` (a save after every 100 changes), and the gateway committing
every 20 ms instead of 200 ms (its intake closer behind the broker).

What this does not measure: SIGKILL ends processes, not the machine. The kernel's page
cache survives, so writes that were not yet on the flash are not lost here; what fsync
protects (the gateway's SQLite with ``--sync full``, Mosquitto's snapshot) is not
exercised. It measures the loss of process memory: the broker's RAM.

    python -m bench.bench_powercut [--quick] [--cuts 8] [--devices 50] [--interval 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import time
from typing import Any

from bench._util import PY, Workdir, machine_info, wait_until
from edgeferry.procs import Broker, Proc

VARIANTS: dict[str, dict[str, Any]] = {
    "edge.conf (autosave_interval 30 s)": {"broker": [], "gateway": []},
    "autosave_on_changes, every 100 changes": {
        "broker": ["autosave_on_changes true", "autosave_interval 100"], "gateway": []},
    "gateway --commit-interval 20ms": {"broker": [], "gateway": ["--commit-interval", "0.02"]},
}


def _store_backlog(store: str) -> int | None:
    r = subprocess.run([PY, "-m", "edgeferry", "gateway", "status", "--store", store, "--json"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return None
    st = json.loads(r.stdout)
    return sum(int(lane["records"]) for lane in st["lanes"].values())


def _site(label: str, variant: dict[str, Any], cuts: int, devices: int, interval: float,
          seed: int) -> dict[str, Any]:
    wd = Workdir("efbench-powercut-")
    rnd = random.Random(seed)
    try:
        cloud = wd.broker("cloud", "cloud").start()
        sink = wd / "sink.jsonl"
        ingest = wd.proc("ingest", [PY, "-m", "edgeferry", "ingest", "run", "--cloud", cloud.url,
                                    "--sink", f"jsonl:{sink}"]).start()
        ingest.wait_for_line(r"ingest ready", 30)
        edge: Broker = wd.broker("edge", "edge", extra=variant["broker"]).start()
        store = str(wd / "store.db")

        def gateway() -> Proc:
            gw = wd.proc("gateway", [PY, "-m", "edgeferry", "gateway", "run", "--local", edge.url,
                                     "--cloud", cloud.url, "--store", store, "--node-id", "powercut",
                                     *variant["gateway"]])
            gw.start()
            gw.wait_for_line(r"gateway ready", 30)
            return gw

        gw = gateway()
        # a site that has run for a while has the gateway's session (its subscriptions) in
        # the broker's snapshot; force the first save now (SIGUSR1), as autosave would
        mark = edge.mark()
        assert edge.pid is not None
        os.kill(edge.pid, signal.SIGUSR1)
        edge.wait_for_log(r"Saving in-memory database", 10, since=mark)
        profile = wd / "profile.yaml"
        duration = 4.0 + cuts * 4.0
        profile.write_text(
            f"devices: {devices}\ninterval: {interval}\nsensors: [temperature]\nseed: {seed}\n"
            f"duration: {duration}\noutbox: 100000\nreconnect: {{initial: 0.1, cap: 0.5}}\n")
        manifest = wd / "manifest.json"
        sim = wd.proc("sim", [PY, "-m", "edgeferry", "sim", "run", "--broker", edge.url, "--profile", str(profile),
                              "--manifest", str(manifest), "--no-progress", "--drain-timeout", "120"]).start()
        t0 = time.monotonic()
        instants = sorted(rnd.uniform(2.0, duration - 2.0) for _ in range(cuts))
        for at in instants:
            while time.monotonic() - t0 < at:
                time.sleep(0.01)  # a bench schedules its faults on the clock
            first_broker = rnd.random() < 0.5
            if first_broker:
                edge.kill()
                gw.kill9()
            else:
                gw.kill9()
                edge.kill()
            edge.start()
            gw = gateway()
        rc = sim.wait(duration + 180)
        # everything the devices sent is at the broker or beyond; wait for the store to empty
        wait_until(lambda: _store_backlog(store) == 0, timeout=120, interval=0.5, what="the gateway's store drains")
        r = subprocess.run([PY, "-m", "edgeferry", "sim", "verify", "--manifest", str(manifest),
                            "--sink", f"jsonl:{sink}", "--json"], capture_output=True, text=True, timeout=120)
        report = json.loads(r.stdout)
        total = report["total"]
        per_cut = total["lost"] / cuts if cuts else 0.0
        return {
            "variant": label, "cuts": cuts, "devices": devices, "msg_s": round(devices / interval),
            "sim_exit": rc, "sent": total["sent"], "delivered": total["delivered"],
            "dropped_by_devices": total["dropped"], "lost": total["lost"], "duplicated": total["duplicated"],
            "lost_per_cut": round(per_cut, 1),
            "lost_per_cut_ms_of_traffic": round(1000 * per_cut / (devices / interval), 1),
            "cut_at_s": [round(a, 2) for a in instants],
            "lost_ranges_sample": {d["device"]: d.get("lost_ranges") for d in report["devices"][:3]},
        }
    except Exception as e:  # a bench reports what failed and keeps the other variants
        wd.keep_logs(wd.path.parent / f"efbench-powercut-logs-{int(time.time())}")
        return {"variant": label, "error": f"{type(e).__name__}: {e}"}
    finally:
        wd.cleanup()


def run(quick: bool, cuts: int | None = None, devices: int = 50, interval: float = 0.1) -> dict[str, Any]:
    cuts = cuts or (4 if quick else 8)
    rows = [_site(label, v, cuts, devices, interval, seed=7 + i) for i, (label, v) in enumerate(VARIANTS.items())]
    return {
        "command": "python -m bench.bench_powercut" + (" --quick" if quick else ""),
        "machine": machine_info(),
        "variants": rows,
    }


def summary(res: dict[str, Any]) -> str:
    lines = [f"  {'variant':<40} {'cuts':>4} {'msg/s':>6} {'sent':>7} {'lost':>6} {'dup':>5} "
             f"{'lost/cut':>8} {'ms/cut':>7}"]
    for v in res["variants"]:
        if "error" in v:
            lines.append(f"  {v['variant']:<40} error: {v['error']}")
            continue
        lines.append(f"  {v['variant']:<40} {v['cuts']:>4} {v['msg_s']:>6} {v['sent']:>7} {v['lost']:>6} "
                     f"{v['duplicated']:>5} {v['lost_per_cut']:>8} {v['lost_per_cut_ms_of_traffic']:>7}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cuts", type=int)
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.1)
    a = p.parse_args()
    res = run(a.quick, a.cuts, a.devices, a.interval)
    print(json.dumps(res, indent=2))
    print(summary(res))


if __name__ == "__main__":
    main()
