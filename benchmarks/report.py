"""Ratios from a pytest-benchmark JSON file.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json

Per group (one op and size), one line per peer: median time, speedup against
the "published" (or "eager") peer, time relative to the "floor" peer (from the
two medians, and "paired": the median ratio of back-to-back calls, robust to a
VM's drifting speed, where the benchmark recorded it), peak
extra memory and how many times less than the published peer's, and the
accuracy metric max_err when the benchmark recorded it.

How noisy the machine was, so a reader can judge a figure: "spread" is the
interquartile range of the timed rounds over their median, "paired q1-q3" the
quartiles of the paired ratio, "load" the 1-minute load average before and
after the benchmark (and, where the run recorded them, at its start and end).
The STF groups run per sigma regime; a summary table per size follows them:
paired ratio per regime, and the error on the "tiny" regime's near-duplicates.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

BASELINES = ("published", "eager", "highest", "dsm eager")   # the last: the train-step groups


def _fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def rows(bench: dict) -> dict[str, list[dict]]:
    """group -> [{peer, median_s, peak_mib, max_err, ...}], in file order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in bench.get("benchmarks", []):
        info = b.get("extra_info", {})
        groups[b.get("group") or b["name"]].append(dict(
            peer=info.get("peer", b["name"]),
            median_s=b["stats"]["median"],
            peak_mib=info.get("peak_mib"),
            max_err=info.get("max_err"),
            paired=info.get("x_floor_paired"),
            q1=info.get("x_floor_q1"),
            q3=info.get("x_floor_q3"),
            spread=_spread(b["stats"]),
            load=(info.get("load_before"), info.get("load_after")),
            regime=info.get("regime"),
            size=(info.get("B"), info.get("N"), info.get("D")),
        ))
    return groups


def _spread(stats: dict):
    iqr, med = stats.get("iqr"), stats.get("median")
    return None if iqr is None or not med or stats.get("rounds", 2) < 2 else iqr / med


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _load(load) -> str:
    a, b = load
    return "-" if a is None else f"{a:.1f}>{b:.1f}"


def _quart(p) -> str:
    return "-" if p["q1"] is None else f"{p['q1']:.2f}-{p['q3']:.2f}"


def report(bench: dict, out=sys.stdout) -> None:
    machine = bench.get("machine_info", {})
    if machine:
        out.write(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
                  f"python {machine.get('python_version', '?')}\n")
    load = bench.get("load", {})
    if load:
        out.write(f"load average (1/5/15 min) at the start: {load.get('start')}, at the end: {load.get('end')}"
                  f" ({load.get('cpus', '?')} CPUs)\n")
    groups = rows(bench)
    for group, peers in groups.items():
        by_name = {p["peer"]: p for p in peers}
        base = next((by_name[n] for n in BASELINES if n in by_name), None)
        floor = by_name.get("floor")
        out.write(f"\n{group}\n")
        out.write(f"  {'peer':<10} {'median ms':>10} {'x faster':>9} {'x floor':>8} {'paired':>7} "
                  f"{'paired q1-q3':>12} {'spread':>7} {'peak MiB':>9} {'x less mem':>10} {'max err':>9} "
                  f"{'load':>9}\n")
        for p in peers:
            speedup = base["median_s"] / p["median_s"] if base else None
            vs_floor = p["median_s"] / floor["median_s"] if floor else None
            mem_ratio = None
            if base and base["peak_mib"] and p["peak_mib"]:
                mem_ratio = base["peak_mib"] / max(p["peak_mib"], 1e-3)
            out.write(f"  {p['peer']:<10} {p['median_s'] * 1e3:>10.2f} {_fmt(speedup, '9.1f'):>9} "
                      f"{_fmt(vs_floor, '8.2f'):>8} {_fmt(p['paired'], '7.2f'):>7} {_quart(p):>12} "
                      f"{_pct(p['spread']):>7} "
                      f"{_fmt(p['peak_mib'], '9.1f'):>9} {_fmt(mem_ratio, '10.0f'):>10} "
                      f"{_fmt(p['max_err'], '9.1e'):>9} {_load(p['load']):>9}\n")
    regime_summary(groups, out)


def regime_summary(groups: dict[str, list[dict]], out=sys.stdout) -> None:
    """Per size, one line per peer: the paired ratio to the floor in each sigma regime and the
    error in the "tiny" regime (near-duplicates at sigma 0.002)."""
    table: dict = defaultdict(lambda: defaultdict(dict))     # size -> peer -> regime -> row
    regimes: list[str] = []
    for peers in groups.values():
        for p in peers:
            if p["regime"] is None:
                continue
            table[p["size"]][p["peer"]][p["regime"]] = p
            if p["regime"] not in regimes:
                regimes.append(p["regime"])
    for (B, N, D), by_peer in table.items():
        out.write(f"\nstf_target B={B} N={N} D={D}: paired x floor per sigma regime; max err in 'tiny'\n")
        out.write(f"  {'peer':<10} " + " ".join(f"{r:>8}" for r in regimes) + f" {'err tiny':>9}\n")
        for peer, by_regime in by_peer.items():
            if peer == "floor":
                continue
            cells = " ".join(f"{_fmt(by_regime.get(r, {}).get('paired'), '8.2f'):>8}" for r in regimes)
            out.write(f"  {peer:<10} {cells} {_fmt(by_regime.get('tiny', {}).get('max_err'), '9.1e'):>9}\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python benchmarks/report.py BENCH.json\n")
        return 2
    with open(argv[0]) as f:
        report(json.load(f))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
