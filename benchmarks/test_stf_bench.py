"""STF target benchmarks: `pytest benchmarks/ --benchmark-only`.

Peers side by side per size (benchmarks/_stf_peers.py): "published" (the B x N x D
broadcast formula of the paper's code), the fastdiff backends ("torch", "cpu" on
CPU; "triton", "cuda" on GPU), "compile" (torch.compile of the plain expansion
formula) and "floor" (the two matrix products alone). Every benchmark records,
in extra_info: peer, sizes, threads, peak extra memory in MiB ("peak_mib") and
the accuracy metric max_i err_i against a float64 target ("max_err").
`python benchmarks/report.py results.json` prints the ratios from a
`--benchmark-json` file.

Environment:
  FASTDIFF_BENCH_DEVICE=cpu|cuda   device (default: cuda if available)
  FASTDIFF_BENCH_SKIP_BIG=1        skip the published peer where its B x N x D
                                   tensors exceed 1 GiB (N=8192 on CPU: 6 GiB)
  FASTDIFF_BENCH_NO_MEMORY=1       skip the peak-memory measurement
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
    PEERS = ["published", "torch", "triton", "cuda", "compile", "floor"]
else:
    SIZES = [(32, N, D) for N in (1024, 2048, 8192)]
    PEERS = ["published", "torch", "cpu", "compile", "floor"]

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


def _skip_reason(peer: str, B: int, N: int, D: int) -> str | None:
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


def _peak_mib(peer, fn, x, sigma, ref, B, N, D):
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
    key = (peer, B, N, D)
    if key not in _memory_cache:
        _memory_cache[key] = P.peak_extra_mib_cpu(peer, B, N, D, torch.get_num_threads())
    return _memory_cache[key]


def _rounds(peer: str, B: int, N: int, D: int) -> int:
    if DEVICE == "cuda":
        return 20
    if peer == "published":
        return 3 if N <= 1024 else 2
    if peer == "torch":
        return 10 if N <= 2048 else 5
    # cheap peers: enough rounds that their medians (and the x-floor ratios)
    # are stable on a noisy 2-core VM
    return 40 if N <= 2048 else 15


# Size outermost, so that a group's peers run one after another.
@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-N{}-D{}".format(*s))
def test_stf_target(benchmark, peer, size):
    B, N, D = size
    why = _skip_reason(peer, B, N, D)
    if why:
        pytest.skip(why)
    x, sigma, ref = P.problem(B, N, D, device=DEVICE)
    fn = P.make_peer(peer, B, N, DEVICE)
    if DEVICE == "cuda":
        inner = fn

        def fn(x, sigma, ref):
            out = inner(x, sigma, ref)
            torch.cuda.synchronize()
            return out

    benchmark.group = f"stf_target B={B} N={N} D={D} {DEVICE}"
    benchmark.extra_info.update(peer=peer, B=B, N=N, D=D, device=DEVICE, threads=torch.get_num_threads())
    out = benchmark.pedantic(fn, args=(x, sigma, ref), rounds=_rounds(peer, B, N, D), iterations=1,
                             warmup_rounds=1)
    if peer != "floor":
        t = out[0] if isinstance(out, tuple) else out
        key = (B, N, D)
        if key not in _oracle_cache:
            _oracle_cache.clear()
            _oracle_cache[key] = P.oracle64(x, sigma, ref)     # on x's device
        benchmark.extra_info["max_err"] = P.max_err(t, _oracle_cache[key], sigma)
    del out
    if peer not in ("floor", "published"):
        benchmark.extra_info["x_floor_paired"] = _paired_floor_ratio(fn, x, sigma, ref, B, N, D, peer)
    benchmark.extra_info["peak_mib"] = _peak_mib(peer, fn, x, sigma, ref, B, N, D)


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
        benchmark.extra_info["x_floor_paired"] = _paired_floor_ratio(fn, x, sigma, ref, B, N, D, peer,
                                                                     precision=precision)


def _paired_floor_ratio(fn, x, sigma, ref, B, N, D, peer, precision="highest") -> float:
    """Median over rounds of time(peer) / time(floor), the two called back to back."""
    floor = P.make_peer("floor", B, N, DEVICE, precision=precision)
    floor(x, sigma, ref)                                  # casts its operands once
    return _paired_ratio(fn, floor, x, sigma, ref, _rounds(peer, B, N, D))


def _paired_ratio(fn, base, x, sigma, ref, rounds: int) -> float:
    """Median over rounds of time(fn) / time(base), the two called back to back.

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
    return statistics.median(ratios)


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
        benchmark.extra_info["x_plain_paired"] = _paired_ratio(fn, plain, x, sigma, ref, rounds)
