"""The summary table of the uplink benchmark (bench/bench_uplink.py): one row per
figure, edgeferry beside the bridge, with the target and whether it was met."""

from __future__ import annotations

from typing import Any

from bench._uplink_pipelines import VARIANTS

__all__ = ["ab_lines", "summary", "table"]


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ok(cond: bool | None) -> str:
    return "-" if cond is None else ("met" if cond else "MISSED")


def _lost_dup(r: dict[str, Any]) -> str:
    return f"{r['lost']} / {r['duplicated']}"


Row = tuple[str, Any, Any, str, str, str]


def _rows_live(lv: dict[str, Any]) -> list[Row]:
    ef, br = lv["edgeferry"], lv["bridge"]

    def med(rows: list[dict[str, Any]], *keys: str) -> float | None:
        vals: list[float] = []
        for row in rows:
            v: Any = row
            for k in keys:
                v = v[k]
            vals.append(v)
        return _median(vals)
    e, b = med(ef, "sink_rate_msg_s"), med(br, "sink_rate_msg_s")
    ratio = e / b if e and b else None
    return [
        ("1 live: delivered msg/s at the sink (median)", e, b,
         f"{ratio:.2f}x" if ratio else "-", ">= 1x bridge", _ok(ratio >= 1 if ratio else None)),
        ("1 live: loadgen msg/s while feeding the pipeline", med(ef, "loadgen_msg_s"),
         med(br, "loadgen_msg_s"), "", "", ""),
        ("1 live: loadgen ceiling alone (msg/s, median)", _median(lv["loadgen_ceiling_msg_s"]),
         None, "", "", ""),
        ("1 live: lost / duplicated (all runs)", f"{sum(r['lost'] for r in ef)} / "
         f"{sum(r['duplicated'] for r in ef)}", f"{sum(r['lost'] for r in br)} / "
         f"{sum(r['duplicated'] for r in br)}", "", "", ""),
        ("6 CPU s/100k live: gateway | edge mosquitto", med(ef, "cpu_s_per_100k", "gateway"),
         med(br, "cpu_s_per_100k", "edge_broker"), "", "", ""),
        ("6 CPU s/100k live: edge mosquitto", med(ef, "cpu_s_per_100k", "edge_broker"),
         med(br, "cpu_s_per_100k", "edge_broker"), "", "", ""),
        ("6 CPU s/100k live: sink process", med(ef, "cpu_s_per_100k", "sink"),
         med(br, "cpu_s_per_100k", "sink"), "", "", ""),
    ]


def _rows_drain(dr: dict[str, Any]) -> list[Row]:
    e, b = dr["edgeferry"], dr["bridge"]
    sp = b["drain_s"] / e["drain_s"] if e["drain_s"] and b["drain_s"] else None
    return [
        ("2 reconnect delay: up() -> first record (s)", e["reconnect_s"], b["reconnect_s"],
         "", "", ""),
        (f"2 drain {dr['messages']:,}: first -> last record (s)", e["drain_s"], b["drain_s"],
         f"{sp:.1f}x faster" if sp else "-", ">= 3x faster", _ok(sp >= 3 if sp else None)),
        ("2 drain rate (msg/s)", e["drain_msg_s"], b["drain_msg_s"], "", "", ""),
        ("2 gateway: all acked by the cloud broker (s after up())",
         e.get("gateway_all_uplinked_s"), None, "", "", ""),
        ("2 sink process peak RSS during the drain (MiB)", e["sink_peak_rss_kb"] / 1024,
         b["sink_peak_rss_kb"] / 1024, "", "", ""),
        ("5 outage: lost / duplicated", _lost_dup(e), _lost_dup(b), "", "0 lost",
         _ok(e["lost"] == 0)),
        ("6 CPU s/100k drain: gateway | edge mosquitto", e["cpu_s_per_100k_drain"]["gateway"],
         b["cpu_s_per_100k_drain"]["edge_broker"], "", "", ""),
        ("6 CPU s/100k offline intake: gateway | edge mosq.",
         e["cpu_s_per_100k_intake"]["gateway"], b["cpu_s_per_100k_intake"]["edge_broker"],
         "", "", ""),
    ]


def _rows_cold(cs: dict[str, Any]) -> list[Row]:
    t = cs["start_to_last_s"]
    return [
        (f"3 cold start, {cs['messages']:,} queued: start -> last record (s)", t, None, "",
         "<= 3 s", _ok(t is not None and t <= 3 and cs["lost"] == 0)),
        ("3 cold start: gateway peak RSS (MiB)", cs["gateway_peak_rss_kb"] / 1024, None,
         "", "", ""),
    ]


def _rows_memory(mem: dict[str, Any]) -> list[Row]:
    es, bs = mem["edgeferry"]["samples"], mem["bridge"]["samples"]
    rows: list[Row] = []
    for s_e, s_b in zip(es[1:], bs[1:], strict=False):
        rows.append((f"4 peak RSS (MiB), {s_e['backlog']:,} backlog", s_e["VmHWM"] / 1024,
                     s_b["VmHWM"] / 1024, "", "", ""))
    peak = es[-1]["VmHWM"] / 1024
    growth = (es[-1]["VmHWM"] - es[1]["VmHWM"]) / 1024
    de, db = mem["edgeferry"]["drain"], mem["bridge"]["drain"]
    rows += [
        (f"4 gateway peak RSS; growth after {es[1]['backlog']:,} (MiB)",
         f"{peak:.1f}; +{growth:.1f}", None, "", "< 35 MB, flat", _ok(peak < 35 and growth < 2)),
        ("4/5 that backlog after up(): lost / duplicated", _lost_dup(de), _lost_dup(db),
         "", "", ""),
        ("4 that backlog: up() -> last record (s)", de["up_to_last_s"], db["up_to_last_s"],
         "", "", ""),
    ]
    return rows


def _rows_kill9(k9: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for kind, row in k9.items():
        if kind.startswith("edgeferry"):
            rows.append((f"5 kill -9 edge side holding {k9['messages']:,} ({kind[10:]})",
                         _lost_dup(row), _lost_dup(k9["bridge"]), "lost / dup", "0 lost",
                         _ok(row["lost"] == 0)))
    return rows


def _rows_flash(fl: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for variant, (sync, extra) in VARIANTS.items():
        if variant in fl:
            flags = " ".join(("--sync", sync, *extra))
            for mode in ("online", "outage"):
                r = fl[variant][mode]
                rows.append((f"7 flash bytes/payload, {mode}, {flags}", r["ratio"], None, "",
                             "<= 3", _ok(r["ratio"] <= 3)))
    return rows


def table(res: dict[str, Any]) -> list[Row]:
    """Rows: (what, edgeferry, bridge, ratio, target, verdict)."""
    rows: list[Row] = []
    parts = [("live", "edgeferry", _rows_live), ("drain", "edgeferry", _rows_drain),
             ("cold_start", "start_to_last_s", _rows_cold), ("memory", "edgeferry", _rows_memory),
             ("kill9", "bridge", _rows_kill9), ("flash", "messages", _rows_flash)]
    for name, key, fn in parts:
        part = res.get(name) or {}
        if key in part:
            rows += fn(part)
    return rows


def ab_lines(dr: dict[str, Any]) -> list[str]:
    """The drain A/B (EFBENCH_AB): per pipeline, each round's figures and their median."""
    keys = [("drain_s", "drain (s)"), ("reconnect_s", "up->first (s)"),
            ("gateway_all_uplinked_s", "gw all acked (s)"), ("sink_peak_rss_kb", "sink RSS (kB)"),
            ("load1", "load")]
    bridge = _median([r["drain_s"] for r in dr["ab"].get("bridge", [])])
    lines = [f"  drain A/B, {dr['messages']:,} messages: each round, then [median]"]
    for kind, rows in dr["ab"].items():
        lines.append(f"  {kind}")
        for k, label in keys:
            vals = [r.get(k) for r in rows]
            if all(v is None for v in vals):
                continue
            lines.append(f"    {label:<18} " + " ".join(_fmt(v) for v in vals)
                         + f"  [{_fmt(_median(vals))}]")
        med = _median([r["drain_s"] for r in rows])
        if kind != "bridge" and med and bridge:
            lines.append(f"    bridge / this: {bridge / med:.1f}x (medians)")
        lost = sum(r["lost"] for r in rows), sum(r["duplicated"] for r in rows)
        lines.append(f"    lost / duplicated: {lost[0]} / {lost[1]}")
    return lines


def summary(res: dict[str, Any]) -> str:
    rows = table(res)
    head = ("what", "edgeferry", "bridge", "ratio", "target", "")
    cells = [head] + [(a, _fmt(b), _fmt(c), d, e, f) for a, b, c, d, e, f in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(6)]
    lines = []
    for i, r in enumerate(cells):
        lines.append("  " + "  ".join(
            r[j].ljust(widths[j]) if j in (0, 3, 4, 5) else r[j].rjust(widths[j])
            for j in range(6)))
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    if "ab" in (res.get("drain") or {}):
        lines += ab_lines(res["drain"])
    errors = [f"  {k}: {v['error']}" for k, v in res.items()
              if isinstance(v, dict) and "error" in v]
    if errors:
        lines += ["  scenarios that failed:"] + errors
    return "\n".join(lines)
