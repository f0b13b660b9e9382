"""STF target benchmarks: `pytest benchmarks/ --benchmark-only`.

Peers side by side per size and sigma regime (benchmarks/_stf_peers.py):
"published" (the B x N x D broadcast formula of the paper's code; its time does
not depend on sigma, so it runs in the "edm" regime only), the fastdiff backends
("torch", "cpu" on CPU; "triton", "cuda" on GPU), "compile" (torch.compile of
the plain expansion formula), "sdpa" (torch's scaled_dot_product_attention),
"keops" (pykeops, optional: skipped with the reason when missing) and "floor"
(the two matrix products alone). Regimes: "edm" (EDM's log-normal sigma), "mid"
(sigma in 5..50) and "tiny" (sigma = 0.002 with a near-duplicate of each
source: its max_err column is each peer's error on that stress case).

Every benchmark records, in extra_info: peer, sizes, regime, threads, peak extra
memory in MiB ("peak_mib"), the accuracy metric max_i err_i against a float64
target ("max_err"), the paired ratio to the floor with its quartiles
("x_floor_paired", "x_floor_q1", "x_floor_q3") and the 1-minute load average
before and after ("load_before", "load_after"), so a reader can judge how noisy
a figure is. With --benchmark-disable (CI's smoke run) each peer runs once, the
paired loop one round, the mid and tiny regimes at the first size only, and the
peak memory in the "edm" regime only.
`python benchmarks/report.py results.json` prints the ratios from a
`--benchmark-json` file.

Environment:
  FASTDIFF_BENCH_DEVICE=cpu|cuda   device (default: cuda if available)
  FASTDIFF_BENCH_SKIP_BIG=1        skip the published peer where its B x N x D
                                   tensors exceed 1 GiB (N=8192 on CPU: 6 GiB)
  FASTDIFF_BENCH_NO_MEMORY=1       skip the peak-memory measurement
  FASTDIFF_BENCH_REGIMES=edm,mid   the sigma regimes to run (default: all three on CPU;
                                   on CUDA all three at B=128 N=4096, "edm" elsewhere)
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import _stf_peers as P
from fastdiff.ops import _dispatch

DEVICE = os.environ.get("FASTDIFF_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
D = 3072
if DEVICE == "cuda":
    SIZES = [(B, N, D) for B in (64, 128, 512) for N in (1024, 4096, 50000)]
    PEERS = ["published", "torch", "triton", "cuda", "compile", "sdpa", "keops", "floor"]
else:
    SIZES = [(32, N, D) for N in (1024, 2048, 8192)]
    PEERS = ["published", "torch", "cpu", "compile", "sdpa", "keops", "floor"]
REGIMES = [r for r in os.environ.get("FASTDIFF_BENCH_REGIMES", ",".join(P.REGIMES)).split(",") if r]
for _r in REGIMES:
    if _r not in P.REGIMES:
        raise ValueError(f"FASTDIFF_BENCH_REGIMES: unknown regime {_r!r}; expected a comma list of {P.REGIMES}")

_memory_cache: dict = {}
_oracle_cache: dict = {}


def _available_bytes() -> int:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()     # mem_get_info does not count what the caching allocator holds
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _skip_reason(peer: str, B: int, N: int, D: int, regime: str = "edm") -> str | None:
    if regime != "edm" and peer == "published":
        return "published's time does not depend on sigma: it runs in the edm regime only"
    if regime != "edm" and DEVICE == "cuda" and "FASTDIFF_BENCH_REGIMES" not in os.environ \
            and (B, N) != (128, 4096):
        return "on CUDA the mid and tiny regimes run at B=128 N=4096 only (FASTDIFF_BENCH_REGIMES widens it)"
    if peer == "keops":
        why = P.keops_status()
        if why:
            return why
    if peer in ("torch", "cpu", "triton", "cuda"):
        status = _dispatch.backend_status(peer, DEVICE, "stf_target")
        if not status.available:
            return f"backend {peer!r} unavailable: {status.reason}"
    if peer == "published":
        need = P.published_bytes(B, N, D)
        if os.environ.get("FASTDIFF_BENCH_SKIP_BIG") == "1" and need > (1 << 30):
            return f"published needs {need / 2**30:.1f} GiB (FASTDIFF_BENCH_SKIP_BIG=1)"
        if need * 1.25 > _available_bytes():
            return f"published needs {need / 2**30:.1f} GiB, more than is available"
    if peer == "compile" and 3 * B * N * 4 * 1.25 > _available_bytes():
        return "compile's B x N logits do not fit"
    return None


def _peak_mib(peer, fn, x, sigma, ref, B, N, D, regime="edm"):
    if os.environ.get("FASTDIFF_BENCH_NO_MEMORY") == "1":
        return None
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(x, sigma, ref)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20
    key = (peer, B, N, D, regime)
    if key not in _memory_cache:
        _memory_cache[key] = P.peak_extra_mib_cpu(peer, B, N, D, torch.get_num_threads(), regime)
    return _memory_cache[key]


def _rounds(peer: str, B: int, N: int, D: int) -> int:
    if DEVICE == "cuda":
        return 20
    if peer == "published":
        return 3 if N <= 1024 else 2
    if peer == "torch":
        return 10 if N <= 2048 else 5
    if peer == "keops":
        return 3 if N <= 2048 else 2
    # cheap peers: enough rounds that their medians (and the x-floor ratios)
    # are stable on a noisy 2-core VM
    return 40 if N <= 2048 else 15


# Size outermost, then regime, so that a group's peers run one after another.
@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-N{}-D{}".format(*s))
def test_stf_target(benchmark, peer, regime, size):
    B, N, D = size
    why = _skip_reason(peer, B, N, D, regime)
    if why is None and benchmark.disabled and regime != "edm" and size != SIZES[0]:
        why = "smoke run (--benchmark-disable): the mid and tiny regimes run at the first size only"
    if why:
        pytest.skip(why)
    load_before = os.getloadavg()[0]
    x, sigma, ref = P.problem(B, N, D, device=DEVICE, regime=regime)
    fn = P.make_peer(peer, B, N, DEVICE)
    if DEVICE == "cuda":
        inner = fn

        def fn(x, sigma, ref):
            out = inner(x, sigma, ref)
            torch.cuda.synchronize()
            return out

    benchmark.group = f"stf_target B={B} N={N} D={D} {DEVICE} sigma {regime}"
    benchmark.extra_info.update(peer=peer, B=B, N=N, D=D, device=DEVICE, regime=regime,
                                threads=torch.get_num_threads())
    out = benchmark.pedantic(fn, args=(x, sigma, ref), rounds=_rounds(peer, B, N, D), iterations=1,
                             warmup_rounds=1)
    if peer != "floor":
        t = out[0] if isinstance(out, tuple) else out
        key = (B, N, D, regime)
        if key not in _oracle_cache:
            _oracle_cache.clear()
            _oracle_cache[key] = P.oracle64(x, sigma, ref)     # on x's device
        benchmark.extra_info["max_err"] = P.max_err(t, _oracle_cache[key], sigma)
    del out
    if peer not in ("floor", "published"):
        ratios = _paired_floor_ratios(fn, x, sigma, ref, B, N, D, peer, rounds=1 if benchmark.disabled else None)
        benchmark.extra_info.update(_quartiles(ratios))
    if not (benchmark.disabled and regime != "edm"):     # the smoke run: the memory path once per peer and size
        benchmark.extra_info["peak_mib"] = _peak_mib(peer, fn, x, sigma, ref, B, N, D, regime)
    benchmark.extra_info.update(load_before=load_before, load_after=os.getloadavg()[0])


# Per backend and mode, one group: "highest" (the baseline of the report's "x faster"
# column, so it reads as the speedup of the mode), the mode, and the floor at the
# mode's precision (TF32 GEMMs for tf32 and tf32x3, bf16 GEMMs for bf16); both
# floor columns of the group are against that floor. CUDA only.
@pytest.mark.skipif(DEVICE != "cuda", reason="the faster precision modes are GPU modes")
@pytest.mark.parametrize("peer", ["highest", "mode", "floor"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "bf16"])
@pytest.mark.parametrize("size", [(512, 4096, 3072), (64, 1024, 16384)], ids=lambda s: "B{}-N{}-D{}".format(*s))
def test_stf_precision_modes(benchmark, size, precision, backend, peer):
    B, N, D = size
    status = _dispatch.backend_status(backend, DEVICE, "stf_target")
    if not status.available:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")
    x, sigma, ref = P.problem(B, N, D, device=DEVICE)
    mode = {"highest": "highest", "mode": precision, "floor": precision}[peer]
    inner = P.make_peer("floor" if peer == "floor" else backend, B, N, DEVICE, precision=mode)

    def fn(x, sigma, ref):
        out = inner(x, sigma, ref)
        torch.cuda.synchronize()
        return out

    name = precision if peer == "mode" else peer
    benchmark.group = f"stf_target B={B} N={N} D={D} {DEVICE} {backend} {precision} vs highest"
    benchmark.extra_info.update(peer=name, B=B, N=N, D=D, device=DEVICE, backend=backend, precision=mode)
    out = benchmark.pedantic(fn, args=(x, sigma, ref), rounds=_rounds(peer, B, N, D), iterations=1,
                             warmup_rounds=1)
    if peer != "floor":
        key = (B, N, D)
        if key not in _oracle_cache:
            _oracle_cache.clear()
            _oracle_cache[key] = P.oracle64(x, sigma, ref)
        benchmark.extra_info["max_err"] = P.max_err(out, _oracle_cache[key], sigma)
        ratios = _paired_floor_ratios(fn, x, sigma, ref, B, N, D, peer, precision=precision,
                                      rounds=1 if benchmark.disabled else None)
        benchmark.extra_info.update(_quartiles(ratios))


def _quartiles(ratios: list[float]) -> dict:
    """The paired ratio's median and quartiles, as extra_info keys."""
    if len(ratios) < 2:
        return dict(x_floor_paired=statistics.median(ratios), x_floor_q1=None, x_floor_q3=None)
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return dict(x_floor_paired=statistics.median(ratios), x_floor_q1=q1, x_floor_q3=q3)


def _paired_floor_ratios(fn, x, sigma, ref, B, N, D, peer, precision="highest", rounds=None) -> list[float]:
    """time(peer) / time(floor) per round, called back to back (rounds: default _rounds)."""
    floor = P.make_peer("floor", B, N, DEVICE, precision=precision)
    floor(x, sigma, ref)                                  # casts its operands once
    return _paired_ratios(fn, floor, x, sigma, ref, rounds or _rounds(peer, B, N, D))


def _paired_ratio(fn, base, x, sigma, ref, rounds: int) -> float:
    """Median over rounds of time(fn) / time(base), the two called back to back."""
    return statistics.median(_paired_ratios(fn, base, x, sigma, ref, rounds))


def _paired_ratios(fn, base, x, sigma, ref, rounds: int) -> list[float]:
    """time(fn) / time(base) per round, the two called back to back.

    A shared VM drifts in speed over seconds; the medians of two benchmarks run
    one after the other inherit that drift, the ratio of adjacent calls does not.
    """
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(x, sigma, ref)
        sync()
        t1 = time.perf_counter()
        base(x, sigma, ref)
        sync()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return ratios


# Reference sets (issue 13): the op with labels / ref_labels, with ref_logw, and with both,
# against the plain op at B=32, N=8192, D=3072 (target: <= 1.05x the plain op on CPU).
# "x_plain_paired" in extra_info is the paired ratio to the plain op. Their accuracy is
# tested in tests/test_stf.py (float64 oracle), not recorded here.
TERMS_SIZE = (32, 8192, 3072)


@pytest.mark.parametrize("peer", ["plain", "labels", "ref_logw", "both"])
@pytest.mark.parametrize("backend", ["cpu", "torch"] if DEVICE == "cpu" else ["cuda", "triton"])
def test_stf_reference_terms(benchmark, backend, peer):
    B, N, D = TERMS_SIZE
    status = _dispatch.backend_status(backend, DEVICE, "stf_target")
    if not status.available:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")
    x, sigma, ref = P.problem(B, N, D, device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def timed(peer_fn):
        def fn(x, sigma, ref):
            out = peer_fn(x, sigma, ref)
            sync()
            return out
        return fn

    plain = timed(P.backend_peer(backend))
    fn = plain if peer == "plain" else timed(P.backend_peer(backend, **P.reference_terms(B, N, peer,
                                                                                         device=DEVICE)))
    benchmark.group = f"stf_target reference terms B={B} N={N} D={D} {DEVICE} {backend}"
    benchmark.extra_info.update(peer=peer, backend=backend, B=B, N=N, D=D, device=DEVICE,
                                threads=torch.get_num_threads())
    rounds = _rounds(backend, B, N, D)
    benchmark.pedantic(fn, args=(x, sigma, ref), rounds=rounds, iterations=1, warmup_rounds=1)
    if peer != "plain":
        # the smoke run (--benchmark-disable) checks the pairing once instead of timing it
        benchmark.extra_info["x_plain_paired"] = _paired_ratio(fn, plain, x, sigma, ref,
                                                               1 if benchmark.disabled else rounds)
