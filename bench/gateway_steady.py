"""The gateway's CPU per 100,000 messages at a steady rate, git ref against git ref:
``python -m bench.gateway_steady REF [REF ...] [--rate 8000] [--count 120000] [--rounds 2]
[--mode live|offline|both]``.

The uplink bench's edgeferry pipeline (bench/_uplink_pipelines.py: edge Mosquitto,
``edgeferry gateway run`` with its defaults, proxy, cloud Mosquitto, ingest), unjailed,
the load generator at a fixed rate (QoS 1, 100-byte payloads, 10 device topics). The
gateway of each ref runs from ``git archive REF`` on ``PYTHONPATH`` **with that export as
its working directory**: ``python -m`` puts the working directory first on ``sys.path``,
so a gateway started in the checkout would import the checkout's code whatever
``PYTHONPATH`` says. Each ref's code is checked to be the one imported.

* live: CPU (utime + stime from ``/proc``, all threads) from before the load generator
  starts until the sink holds every message;
* offline: the cloud link cut first; from before the load generator starts until every
  message is committed and acknowledged to the local broker (the intake while offline).

The refs alternate order round by round. One line of JSON per measurement, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench._uplink_pipelines import Edgeferry, build_accelerator
from bench._util import REPO, Loadgen, count_run, cpu_seconds


def export(ref: str, root: str) -> str:
    """``git archive REF`` of the packages the gateway imports, in a new directory, with
    its C accelerator built if it has one."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True,
                         capture_output=True, text=True).stdout.strip()
    dest = os.path.join(root, sha)
    os.makedirs(dest)
    tar = subprocess.run(["git", "-C", str(REPO), "archive", sha, "edge", "gateway", "edgeferry",
                          "firmware_sim"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=tar, check=True)
    build_accelerator(dest)
    env = dict(os.environ, PYTHONPATH=dest)
    got = subprocess.run([sys.executable, "-c", "import gateway, edge._codec as c; print(gateway.__file__, c.__file__,"
                          " getattr(c, 'PARSE_PATH', 'python'))"],
                         cwd=dest, env=env, check=True, capture_output=True, text=True).stdout.split()
    if not all(g.startswith(dest) for g in got[:2]):
        raise RuntimeError(f"{ref}: imports {got[:2]}, not the export in {dest}")
    print(f"{ref} ({sha}): parse path {got[2]}", flush=True)
    return dest


def _times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, all threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(rest[11]) / tick, int(rest[12]) / tick


def _io(pid: int) -> dict[str, int]:
    """The process's read and write system calls so far (/proc/PID/io; all threads)."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _threads(pid: int) -> dict[str, tuple[float, int]]:
    """Per thread (by name and tid): CPU seconds (utime + stime) and wake-ups (voluntary
    context switches) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                vol = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))
        except (OSError, StopIteration):
            continue
        out["main" if tid == str(pid) else tid] = ((int(rest[11]) + int(rest[12])) / tick, vol)
    return out


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def one(src: str, mode: str, rate: int, n: int, tag: str, pyspy: str = "", perf: str = "") -> dict[str, Any]:
    p = Edgeferry(tag, src=src)  # gateway and ingest run from the export, as their cwd
    try:
        run = f"steady-{tag}"
        offline = mode == "offline"
        if offline:
            p.cut()
            p.wait_links(cloud=False)
        load0 = _loadavg()
        pid = p.gateway.pid
        cpu0 = cpu_seconds(pid)
        io0, t0s, th0 = _io(pid), _times(pid), _threads(pid)
        t0 = time.monotonic()
        lg = Loadgen(p.edge.url, n, run, rate=rate).start()
        spy = None
        if pyspy:  # the middle half of the run; py-spy's stops inflate the CPU figure
            spy = subprocess.Popen(["py-spy", "record", "-r", "250", "--format", "raw",
                                    "-o", f"{pyspy}-{tag}.txt", "-p", str(pid), "-d", str(max(1, n // rate // 2))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if perf:  # the middle half of the run
            spy = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", f"{perf}-{tag}.data",
                                    "-p", str(pid), "--", "sleep", str(max(1, n // rate // 2))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if offline:
            # the load generator is done when the broker has everything; then poll the
            # gateway's status (each status request costs the gateway CPU: not meanwhile)
            sent = lg.result()
            p.wait_backlog(n, timeout=120 + n / 1000)
            lost = None
        else:
            p.tail.wait(n, timeout=120 + n / 1000, quiet=15, busy_pids=p.sink_pids())
        cpu1 = cpu_seconds(pid)
        io1, t1s, th1 = _io(pid), _times(pid), _threads(pid)
        wall = time.monotonic() - t0
        if not offline:
            sent = lg.result()
        if spy is not None:
            spy.wait(60)
        if not offline:
            c = count_run(p.sink, run, n)
            lost = c["lost"] + c["duplicated"]
        return {"mode": mode, "cpu_per_100k": round((cpu1 - cpu0) * 100_000 / n, 3),
                "sys_per_100k": round((t1s[1] - t0s[1]) * 100_000 / n, 3),
                "wall_s": round(wall, 1), "loadgen_msg_s": sent["rate"], "lost_or_dup": lost,
                "reads_per_msg": round((io1["syscr"] - io0["syscr"]) / n, 3),
                "writes_per_msg": round((io1["syscw"] - io0["syscw"]) / n, 3),
                "threads": {t: [round((c - th0.get(t, (0, 0))[0]) * 100_000 / n, 3),
                                round((w - th0.get(t, (0, 0))[1]) / wall)]
                            for t, (c, w) in th1.items() if c > th0.get(t, (0, 0))[0]},
                "load": [load0, _loadavg()], "utc": time.strftime("%H:%M:%S", time.gmtime())}
    finally:
        p.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("refs", nargs="+")
    ap.add_argument("--rate", type=int, default=8000)
    ap.add_argument("--count", type=int, default=120_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mode", choices=("live", "offline", "both"), default="both")
    ap.add_argument("--pyspy", default="", help="record py-spy (raw) to PREFIX-TAG.txt")
    ap.add_argument("--perf", default="", help="record perf -g to PREFIX-TAG.data")
    a = ap.parse_args()
    modes = ("live", "offline") if a.mode == "both" else (a.mode,)
    res: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="efsteady-") as root:
        srcs = {ref: export(ref, root) for ref in a.refs}
        for rnd in range(a.rounds):
            order = a.refs if rnd % 2 == 0 else a.refs[::-1]
            for mode in modes:
                for ref in order:
                    row = one(srcs[ref], mode, a.rate, a.count, f"{mode[:3]}{rnd}-{ref[:8]}", a.pyspy, a.perf)
                    row.update(ref=ref, round=rnd)
                    print(json.dumps(row), flush=True)
                    res.setdefault(ref, {}).setdefault(mode, []).append(row["cpu_per_100k"])
    print(f"gateway CPU s per 100,000 at {a.rate} msg/s, {a.count} messages, "
          f"{a.rounds} rounds (each round's figure):")
    for ref, by_mode in res.items():
        print(f"  {ref:>12}: " + "; ".join(f"{m} {' / '.join(f'{x:.3f}' for x in xs)}"
                                          for m, xs in by_mode.items()))


if __name__ == "__main__":
    main()
