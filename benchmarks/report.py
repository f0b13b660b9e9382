"""Ratios from a pytest-benchmark JSON file.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json

Per group (one op and size), one line per peer: median time, speedup against
the "published" (or "eager") peer, time relative to the "floor" peer (from the
two medians, and "paired": the median ratio of back-to-back calls, robust to a
VM's drifting speed, where the benchmark recorded it), peak
extra memory and how many times less than the published peer's, and the
accuracy metric max_err when the benchmark recorded it.
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
        ))
    return groups


def report(bench: dict, out=sys.stdout) -> None:
    machine = bench.get("machine_info", {})
    if machine:
        out.write(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
                  f"python {machine.get('python_version', '?')}\n")
    for group, peers in rows(bench).items():
        by_name = {p["peer"]: p for p in peers}
        base = next((by_name[n] for n in BASELINES if n in by_name), None)
        floor = by_name.get("floor")
        out.write(f"\n{group}\n")
        out.write(f"  {'peer':<10} {'median ms':>10} {'x faster':>9} {'x floor':>8} {'paired':>7} "
                  f"{'peak MiB':>9} {'x less mem':>10} {'max err':>9}\n")
        for p in peers:
            speedup = base["median_s"] / p["median_s"] if base else None
            vs_floor = p["median_s"] / floor["median_s"] if floor else None
            mem_ratio = None
            if base and base["peak_mib"] and p["peak_mib"]:
                mem_ratio = base["peak_mib"] / max(p["peak_mib"], 1e-3)
            out.write(f"  {p['peer']:<10} {p['median_s'] * 1e3:>10.2f} {_fmt(speedup, '9.1f'):>9} "
                      f"{_fmt(vs_floor, '8.2f'):>8} {_fmt(p['paired'], '7.2f'):>7} {_fmt(p['peak_mib'], '9.1f'):>9} "
                      f"{_fmt(mem_ratio, '10.0f'):>10} {_fmt(p['max_err'], '9.1e'):>9}\n")


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
