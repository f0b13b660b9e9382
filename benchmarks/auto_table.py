"""The measured `backend="auto"` table for stf_target on CUDA, from GPU benchmark JSON.

    python benchmarks/auto_table.py OUT/bench-stf.json OUT/bench-modes.json

Reads the GPU runs of benchmarks/test_stf_bench.py (written by benchmarks/gpu_run.sh) and
prints, per precision and size, the fastest of the `triton` and `cuda` backends (for
"highest", among those whose measured error met the 1e-4 contract; a faster mode's error
depends on sigma and both backends implement the same mode), as the AUTO_BY_SIZE literal to paste
into fastdiff/ops/_dispatch.py, with the timings it was chosen from as comments.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

GPU_BACKENDS = ("triton", "cuda")


CONTRACT = 1e-4      # precision="highest": max_i err_i, DESIGN.md


def entries(paths: list[str]):
    """Yields (precision, (B, N, D), backend, median_s, max_err) for every GPU backend run."""
    for path in paths:
        with open(path) as f:
            bench = json.load(f)
        for b in bench.get("benchmarks", []):
            info = b.get("extra_info", {})
            if info.get("device") != "cuda":
                continue
            backend = info.get("backend", info.get("peer"))
            if backend not in GPU_BACKENDS or info.get("peer") == "floor":
                continue
            if info.get("regime", "edm") != "edm":      # the table is chosen at EDM's training sigma
                continue
            precision = info.get("precision", "highest")
            yield precision, (info["B"], info["N"], info["D"]), backend, b["stats"]["median"], info.get("max_err")


def table(paths: list[str]) -> dict[str, list[tuple]]:
    best: dict = defaultdict(dict)          # precision -> size -> backend -> (median, err)
    for precision, size, backend, median, err in entries(paths):
        prev = best[precision].setdefault(size, {}).get(backend)
        if prev is None or median < prev[0]:
            best[precision][size][backend] = (median, err)
    out: dict[str, list[tuple]] = {}
    for precision, sizes in sorted(best.items()):
        bound = CONTRACT if precision == "highest" else None
        rows = []
        for size, runs in sorted(sizes.items()):
            ok = {k: v for k, v in runs.items() if bound is None or (v[1] is not None and v[1] <= bound)}
            if ok:
                rows.append((size, min(ok, key=lambda k: ok[k][0]), runs))
        out[precision] = rows
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.stderr.write("usage: python benchmarks/auto_table.py BENCH.json [BENCH.json ...]\n")
        return 2
    print("AUTO_BY_SIZE = {   # measured: " + ", ".join(argv))
    print('    "stf_target": {"cuda": {')
    for precision, rows in table(argv).items():
        print(f"        {precision!r}: [")
        for (B, N, D), winner, runs in rows:
            times = ", ".join(f"{k} {v[0] * 1e3:.3f} ms err {v[1]:.1e}" for k, v in sorted(runs.items())
                              if v[1] is not None)
            print(f"            (({B}, {N}, {D}), {winner!r}),   # {times}")
        print("        ],")
    print("    }},")
    print("}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
