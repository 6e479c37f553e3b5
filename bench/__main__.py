"""Run the benchmarks: ``python -m bench [--quick] [--only NAME]``.

Runs ``run(quick)`` of every ``bench/bench_<name>.py`` present (uplink, service, sim),
prints a summary table and writes the full results to ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ORDER = ["uplink", "service", "sim"]


def _available() -> list[str]:
    found = sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def _flatten(prefix: str, v: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), x, out)
    elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        for i, x in enumerate(v):
            _flatten(f"{prefix}[{i}]", x, out)
    else:
        out.append((prefix, json.dumps(v) if not isinstance(v, str) else v))


def _summary(name: str, res: dict[str, Any]) -> None:
    summarize = getattr(importlib.import_module(f"bench.bench_{name}"), "summary", None)
    print(f"\n=== {name} ===")
    if summarize is not None:
        print(summarize(res))
        return
    rows: list[tuple[str, str]] = []
    _flatten("", res, rows)
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced sizes, about a minute per bench")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this bench (repeatable): " + ", ".join(_available()))
    a = p.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C: every finally block runs and cleans up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = _available()
    if a.only:
        unknown = [n for n in a.only if n not in names]
        if unknown:
            print(f"error: no bench named {', '.join(unknown)} (have: {', '.join(names)})",
                  file=sys.stderr)
            return 2
        names = [n for n in names if n in a.only]
    from bench._util import machine_info

    machine = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    failed = []
    done: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"\n--- bench {name}{' (quick)' if a.quick else ''} ---", flush=True)
        t0 = time.monotonic()
        try:
            mod = importlib.import_module(f"bench.bench_{name}")
            res = mod.run(a.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        elapsed = round(time.monotonic() - t0, 1)
        res = {"bench": name, "machine": machine, "elapsed_s": elapsed, **res}
        (HERE / "results" / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
        done[name] = res
    for name, res in done.items():
        _summary(name, res)
        print(f"  (full results: bench/results/{name}.json)")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
