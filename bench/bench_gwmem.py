"""The gateway's resident memory, idle and holding a backlog, against a git ref.

The uplink bench's edgeferry pipeline (bench/_uplink_pipelines.py: edge Mosquitto ->
``edgeferry gateway run`` with its defaults -> proxy -> cloud Mosquitto -> ingest). Per
gateway and round: its VmRSS and VmHWM (peak RSS) once ready; then the cloud link is cut
and the load generator sends ``messages`` (1,000,000; 200,000 with --quick) in four
steps, sampled after each is committed; then the link comes back and the backlog drains
to the sink (counted: lost, duplicated), and the peak is read again. The peak after the
drain is the figure of issue 15's target ("under 30 MB", i.e. 29,297 KiB: /proc reports
KiB). Beside it: where the resident memory is (/proc/PID/smaps: anonymous, the heap,
each shared library) once ready and after the drain.

    python -m bench --only gwmem [--quick]
    python -m bench.bench_gwmem [--quick] [--messages N] [--rounds N] [--ab GITREF]

``--ab REF`` runs the gateway of git ref REF and that of HEAD, both exported with
``git archive`` (edge, gateway, edgeferry, firmware_sim) and put first on PYTHONPATH,
interleaved (the order alternates per round): the same code path for both. Without it,
the gateway of this checkout alone. Never part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from bench._uplink_pipelines import Edgeferry, export
from bench._util import PY, REPO, Workdir, count_run, machine_info, mem_kb, run_loadgen

__all__ = ["run", "summary"]

STEPS = 4


def log(msg: str) -> None:
    print(f"  [gwmem {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def smaps(pid: int) -> dict[str, int]:
    """Resident KiB per mapping name: "anon", "heap", "stack" or a file's base name."""
    out: Counter[str] = Counter()
    name = "anon"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=6)
            if not head[0].endswith(":"):  # a mapping's first line: range perms offset dev inode [path]
                path = head[5].strip() if len(head) > 5 else ""
                name = path.strip("[]") if path.startswith("[") else os.path.basename(path) or "anon"
            elif head[0] == "Rss:":
                out[name] += int(head[1])
    return dict(out.most_common())


def _export(ref: str, wd: Workdir) -> str:
    dest = export(ref, wd / ref.replace("/", "_"))
    # compiled now, as pip does at install: compiling at import would raise the peak
    subprocess.run([PY, "-m", "compileall", "-q", dest], check=True)
    return dest


def _one(label: str, src: str | None, n: int, rnd: int) -> dict[str, Any]:
    p = Edgeferry(f"gwmem{rnd}", src=src)  # src: the exported packages it runs from
    try:
        pid = p.gateway.pid
        if src and os.path.realpath(f"/proc/{pid}/cwd") != os.path.realpath(src):
            raise RuntimeError(f"{label}: the gateway does not run from {src}: not an A/B")
        row: dict[str, Any] = {"gateway": label, "round": rnd, "loadavg": _loadavg(),
                               "ready": mem_kb(pid), "ready_smaps": smaps(pid), "steps": []}
        run = f"gwmem-{rnd}-{label}"
        p.cut()
        p.wait_links(cloud=False)
        chunk = n // STEPS
        for k in range(STEPS):
            run_loadgen(p.edge.url, chunk, run, start=k * chunk)
            p.wait_backlog((k + 1) * chunk)
            row["steps"].append({"backlog": (k + 1) * chunk, **mem_kb(pid)})
        t_up = time.monotonic()
        p.up()
        w = p.tail.wait(chunk * STEPS, timeout=900, quiet=15, busy_pids=p.sink_pids())
        c = count_run(p.sink, run, chunk * STEPS)
        row.update({"drained": {**mem_kb(pid), "lost": c["lost"], "duplicated": c["duplicated"],
                                "up_to_last_s": round(w["last"] - t_up, 2) if w["last"] else None},
                    "drained_smaps": smaps(pid), "loadavg_end": _loadavg()})
        log(f"{label} round {rnd}: ready {row['ready']}, steps {[s['VmHWM'] for s in row['steps']]}, "
            f"drained {row['drained']} (load {row['loadavg']} .. {row['loadavg_end']})")
        return row
    finally:
        p.close()


def run(quick: bool, n: int | None = None, rounds: int | None = None, ab: str | None = None) -> dict[str, Any]:
    n = n or (200_000 if quick else 1_000_000)
    rounds = rounds or (1 if quick else 2)
    out: dict[str, Any] = {"machine": machine_info(), "messages": n, "rows": [],
                           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    src_wd = Workdir("efbench-gwmemsrc-")
    try:
        if ab:
            head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                                  capture_output=True, text=True).stdout.strip()
            variants: list[tuple[str, str | None]] = [(f"HEAD {head}", _export("HEAD", src_wd)),
                                                      (ab, _export(ab, src_wd))]
        else:
            variants = [("this checkout", None)]
        for rnd in range(rounds):
            for label, src in (variants if rnd % 2 == 0 else variants[::-1]):
                out["rows"].append(_one(label, src, n, rnd))
    finally:
        src_wd.cleanup()
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return out


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def summary(res: dict[str, Any]) -> str:
    lines = [f"  {res['messages']:,} messages of backlog, {res['started']} .. {res['finished']}; "
             "MiB (30 MB = 28.6 MiB)"]
    for r in res["rows"]:
        d = r["drained"]
        lines.append(f"  {r['gateway']:<16} round {r['round']}: ready {_mib(r['ready']['VmRSS'])}; peak at "
                     + " / ".join(_mib(s["VmHWM"]) for s in r["steps"])
                     + f"; after the drain {_mib(d['VmHWM'])} (lost {d['lost']}, dup {d['duplicated']}, "
                     f"{d['up_to_last_s']} s); load {r['loadavg']} .. {r['loadavg_end']}")
        top = ", ".join(f"{k} {_mib(v)}" for k, v in list(r["drained_smaps"].items())[:6])
        lines.append(f"    after the drain: {top}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--messages", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--ab", metavar="REF", help="run the gateways of HEAD and of this git ref (interleaved)")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = run(a.quick, a.messages, a.rounds, a.ab)
    print(json.dumps(res, indent=2))
    print(summary(res))


if __name__ == "__main__":
    main()
