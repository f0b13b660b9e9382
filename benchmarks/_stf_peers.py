"""Peers and data for the STF target benchmarks (benchmarks/test_stf_bench.py).

Each peer is `fn(x, sigma, ref) -> t` with x (B, D), sigma (B,), ref (N, D):

- published: the formula of the STF authors' code, as the paper describes it:
  a B x N x D broadcast of differences, squared and summed, max-subtracted,
  exponentiated and normalized, then ref repeated to a B x N x D tensor,
  multiplied by the weights and summed over N. Rewritten here, not copied.
- compile:   torch.compile of a well-written plain formula (expansion logits,
  softmax, matmul): fast, but not exact at small sigma.
- floor:     the two matrix products the op cannot avoid, x @ ref.T and
  w @ ref, and nothing else, at the precision being compared.
- sdpa:      torch's scaled_dot_product_attention, what a PyTorch user would
  write instead: softmax_k(x_i.r_k / sigma_i^2 - ||r_k||^2 / (2 sigma_i^2))
  (the row constant ||x_i||^2 / (2 sigma_i^2) cancels in the softmax) with
  q = x / sigma^2, k = v = ref and the second term as an additive mask; fp32,
  not exact at small sigma. On CUDA, the memory-efficient kernel only.
- keops:     KeOps (pykeops) LazyTensor sumsoftmaxweight over direct
  differences, the library built for this reduction; optional (keops_status).
- torch / cpu / triton / cuda: fastdiff.stf_target with that backend.

Sigma regimes (`problem(..., regime=)`): "edm", EDM's training log-normal;
"mid", log-uniform in [5, 50], where the weights spread over many rows while
the fp32 GEMM's error still matters; "tiny", sigma = 0.002 on data with a
near-duplicate of each source at distance ~sigma (the accuracy stress case).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fastdiff


def published(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    diff = x[:, None, :] - ref[None, :, :]                       # B x N x D
    logits = -(diff ** 2).sum(-1) / (2 * sigma[:, None] ** 2)    # B x N
    logits = logits - logits.max(dim=1, keepdim=True).values
    w = torch.exp(logits)
    w = w / w.sum(dim=1, keepdim=True)
    target = ref[None, :, :].repeat(x.shape[0], 1, 1)            # B x N x D copy of ref
    return (w[:, :, None] * target).sum(1)                       # B x N x D product, summed


def plain(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * (x @ ref.T) + (ref * ref).sum(1)[None, :]
    w = torch.softmax(-d2 / (2 * sigma[:, None] ** 2), dim=1)
    return w @ ref


_compiled = None


def compiled(x, sigma, ref):
    global _compiled
    if _compiled is None:
        # one graph per (B, N): the CUDA suite has 9 sizes, past dynamo's default limit of 8,
        # where fullgraph=True fails instead of falling back
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled = torch.compile(plain, fullgraph=True, dynamic=False)
    return _compiled(x, sigma, ref)


def sdpa(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    s2 = (sigma.to(x.dtype) ** 2)[:, None]
    q = x / s2                                              # (B, D)
    mask = (ref * ref).sum(1)[None, :] / (-2.0 * s2)        # (B, N): -||r_k||^2 / (2 sigma_i^2)
    args = (q[None, None], ref[None, None], ref[None, None])
    if x.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            out = F.scaled_dot_product_attention(*args, attn_mask=mask[None, None], scale=1.0)
    else:
        out = F.scaled_dot_product_attention(*args, attn_mask=mask[None, None], scale=1.0)
    return out[0, 0]


_keops_why: list = []


def keops_status() -> str | None:
    """None if the keops peer can run, else why not: pykeops must import and compile a tiny
    reduction (it builds its kernels with the system compiler and pybind11 on first use)."""
    if not _keops_why:
        try:
            import pykeops  # noqa: F401
            from pykeops.torch import LazyTensor  # noqa: F401
        except Exception as e:    # ImportError, or pykeops failing at import
            _keops_why.append(f"pykeops unavailable ({type(e).__name__}: {e}); `pip install --no-deps pykeops "
                              "keopscore pybind11` adds the KeOps peer (it compiles its kernel on first use)")
        else:
            try:
                keops(torch.zeros(2, 3), torch.ones(2), torch.zeros(4, 3))
                _keops_why.append(None)
            except Exception as e:
                first = str(e).strip().splitlines()[:1]
                _keops_why.append(f"pykeops cannot compile its kernels here ({type(e).__name__}: "
                                  f"{first[0] if first else ''}); it needs a C++ compiler and pybind11")
    return _keops_why[0]


def keops(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    from pykeops.torch import LazyTensor
    xi = LazyTensor(x[:, None, :])
    rj = LazyTensor(ref[None, :, :])
    w = LazyTensor((0.5 / sigma.to(x.dtype) ** 2)[:, None, None])
    logits = -((xi - rj) ** 2).sum(-1) * w                  # direct differences, never B x N x D in memory
    return logits.sumsoftmaxweight(rj, axis=1)


def make_floor(B: int, N: int, dtype=torch.float32, device="cpu", precision: str = "highest"):
    """The two GEMMs alone, on preallocated weights (their values do not matter), at the
    matching precision: float32 GEMMs for "highest" (cuBLAS without TF32, torch's default),
    TF32 GEMMs for "tf32" and "tf32x3" (the 3xTF32 mode has no cuBLAS peer; TF32 is the
    lower bound), bfloat16 operands for "bf16"."""
    if precision not in ("highest", "tf32x3", "tf32", "bf16"):
        raise ValueError(f"precision must be 'highest', 'tf32x3', 'tf32' or 'bf16'; got {precision!r}")
    op_dtype = torch.bfloat16 if precision == "bf16" else dtype
    w = torch.full((B, N), 1.0 / N, dtype=op_dtype, device=device)
    cast: dict = {}

    def operands(x, ref):
        if op_dtype == x.dtype:
            return x, ref
        key = (x.data_ptr(), ref.data_ptr())      # cast once per problem, outside the timing
        if key not in cast:
            cast.clear()
            cast[key] = (x.to(op_dtype), ref.to(op_dtype))
        return cast[key]

    def floor(x, sigma, ref):
        xo, ro = operands(x, ref)
        if precision in ("tf32", "tf32x3"):
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
            try:
                return w @ ro, xo @ ro.T
            finally:
                torch.set_float32_matmul_precision(old)
        return w @ ro, xo @ ro.T
    return floor


def backend_peer(backend: str, precision: str = "highest", **terms):
    """fastdiff.stf_target on `backend`; terms: labels / ref_labels / ref_logw (reference_terms)."""
    def fn(x, sigma, ref):
        return fastdiff.stf_target(x, sigma, ref, backend=backend, precision=precision, **terms)
    return fn


def reference_terms(B: int, N: int, kind: str, *, seed: int = 1, device="cpu") -> dict:
    """stf_target's keyword arguments for the reference-set benchmarks: "labels" (10 classes;
    a query row's label is its source's, ref[:B] as in `problem`), "ref_logw" (log-weights
    ~ N(0, 1), every 10th row but the sources excluded with -inf), or "both"."""
    g = torch.Generator().manual_seed(seed)
    terms = {}
    if kind in ("labels", "both"):
        ref_labels = torch.randint(0, 10, (N,), generator=g)
        terms.update(labels=ref_labels[:B].to(device), ref_labels=ref_labels.to(device))
    if kind in ("ref_logw", "both"):
        ref_logw = torch.randn(N, generator=g)
        ref_logw[B::10] = -math.inf
        terms.update(ref_logw=ref_logw.to(device))
    return terms


def image_like(n: int, D: int = 3072, *, generator: torch.Generator | None = None,
               device="cpu") -> torch.Tensor:
    """(n, D) smooth random images in [-1, 1], shaped C x s x s with D = C s^2: 3 channels
    (pixels, 3 x 32 x 32 for D = 3072) or else 4 (latents, 4 x 64 x 64 for D = 16384).

    Each image is low-resolution noise (4 x 4 to 16 x 16) upsampled bilinearly
    to s x s, plus a class prototype shared by a tenth of the images, so the
    set has the near-neighbour structure of real data rather than that of
    white noise (where every pair is far apart and STF's weights are trivial).
    """
    for C in (3, 4):
        side = int(round(math.sqrt(D / C)))
        if C * side * side == D:
            break
    else:
        raise ValueError(f"D must be 3 s^2 or 4 s^2, got {D}")
    g = generator
    protos = F.interpolate(torch.randn(10, C, 4, 4, generator=g), size=(side, side), mode="bilinear",
                           align_corners=False)
    out = torch.empty(n, C, side, side)
    for res in (4, 8, 16):
        idx = torch.arange(n)[torch.arange(n) % 3 == (4, 8, 16).index(res)]
        if idx.numel():
            z = torch.randn(idx.numel(), C, res, res, generator=g) * (4.0 / res)
            out[idx] = F.interpolate(z, size=(side, side), mode="bilinear", align_corners=False)
    out += protos[torch.randint(0, 10, (n,), generator=g)]
    out = torch.tanh(out)
    return out.reshape(n, D).to(device)


REGIMES = ("edm", "mid", "tiny")


def edm_sigma(B: int, *, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """EDM's training noise levels: ln sigma ~ N(-1.2, 1.2^2)."""
    return torch.exp(-1.2 + 1.2 * torch.randn(B, generator=generator)).to(device)


def regime_sigma(regime: str, B: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) float32 noise levels of a sigma regime (REGIMES)."""
    if regime == "edm":
        return edm_sigma(B, generator=generator)
    if regime == "mid":
        return torch.exp(math.log(5.0) + math.log(10.0) * torch.rand(B, generator=generator))
    if regime == "tiny":
        return torch.full((B,), 0.002)
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")


_last_problem: dict = {}


def problem(B: int, N: int, D: int = 3072, *, seed: int = 0, device="cpu", regime: str = "edm"):
    """(x, sigma, ref) with x = ref[:B] + sigma * noise, as in STF training, sigma from
    `regime` (REGIMES; "tiny" also moves ref[B:2B] to a near-duplicate of ref[:B] at
    distance sigma). The last one is kept (building N = 50000 images takes seconds, and a
    size's peers run in a row); callers must not modify it."""
    key = (B, N, D, seed, str(device), regime)
    if key not in _last_problem:
        _last_problem.clear()
        g = torch.Generator().manual_seed(seed)
        ref = image_like(N, D, generator=g)
        sigma = regime_sigma(regime, B, generator=g)
        if regime == "tiny":
            n_dup = max(0, min(B, N - B))
            step = torch.randn(n_dup, D, generator=g)
            ref[B:B + n_dup] = ref[:n_dup] + step * (sigma[:n_dup, None] / step.norm(dim=1, keepdim=True))
        x = ref[:B] + sigma[:, None] * torch.randn(B, D, generator=g)
        _last_problem[key] = (x.to(device).contiguous(), sigma.to(device), ref.to(device).contiguous())
    return _last_problem[key]


def oracle64(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """float64 target for the error column of the report (float64 expansion, chunked over N;
    its error at these scales and sigma >= 1e-3 is far below float32 resolution)."""
    x64, s64 = x.double(), sigma.double()
    inv2s2 = 0.5 / s64 ** 2
    xn = (x64 * x64).sum(1)
    N = ref.shape[0]
    step = max(1, (256 << 20) // (8 * max(1, x.shape[0]) + 8 * ref.shape[1]))
    m = torch.full_like(xn, -math.inf)
    s = torch.zeros_like(xn)
    acc = torch.zeros_like(x64)
    for k0 in range(0, N, step):
        r64 = ref[k0:k0 + step].double()
        d2 = (xn[:, None] - 2.0 * (x64 @ r64.T) + (r64 * r64).sum(1)[None, :]).clamp_min(0)
        logit = -d2 * inv2s2[:, None]
        m_new = torch.maximum(m, logit.amax(1))
        scale = torch.exp(m - m_new)
        p = torch.exp(logit - m_new[:, None])
        s = s * scale + p.sum(1)
        acc = acc * scale[:, None] + p @ r64
        m = m_new
    return acc / s[:, None]


def max_err(t: torch.Tensor, t64: torch.Tensor, sigma: torch.Tensor) -> float:
    """max_i ||t_i - t64_i|| / (sigma_i sqrt(D)), the accuracy contract's metric."""
    D = t64.shape[1]
    e = (t.double().reshape(t64.shape) - t64).norm(dim=1) / (sigma.double() * math.sqrt(D))
    return float(e.max())


def make_peer(name: str, B: int, N: int, device, precision: str = "highest") -> callable:
    if name == "published":
        return published
    if name == "compile":
        return compiled
    if name == "floor":
        return make_floor(B, N, device=device, precision=precision)
    if name == "sdpa":
        return sdpa
    if name == "keops":
        return keops
    return backend_peer(name, precision)


def published_bytes(B: int, N: int, D: int, elt: int = 4) -> int:
    """Peak of `published`: three B x N x D tensors live at once (diff, which stays alive,
    and the repeated ref and its product with the weights; measured on CPU: 3 B N D 4)."""
    return 3 * B * N * D * elt


# ----------------------------------------------------------------------------
# peak extra memory on CPU, in a fresh process
# ----------------------------------------------------------------------------
# torch's CPU allocations are invisible to tracemalloc and torch keeps no CPU
# allocator statistics, so the peak is read from the kernel: a fresh process
# builds the inputs, runs the peer once (compiling it, for torch.compile),
# resets its peak resident size (/proc/self/clear_refs), runs the peer again
# and reports VmHWM - VmRSS(before). MALLOC_MMAP_THRESHOLD_ makes every
# allocation of 64 KiB or more its own mapping, returned to the system when
# freed, so memory freed by the first run cannot hide the second run's peak.

def _status_kib(key: str) -> int:
    import re
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def peak_extra_mib_cpu(peer: str, B: int, N: int, D: int, threads: int, regime: str = "edm") -> float | None:
    """Peak extra resident memory (MiB) of one call of `peer`, or None if it cannot be measured."""
    import os
    import subprocess
    import sys
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--peak", peer, str(B), str(N), str(D), str(threads), regime]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return float(out.stdout.strip().splitlines()[-1])


def _peak_main(peer: str, B: int, N: int, D: int, threads: int, regime: str) -> None:
    import gc
    torch.set_num_threads(threads)
    x, sigma, ref = problem(B, N, D, regime=regime)
    fn = make_peer(peer, B, N, "cpu")
    fn(x, sigma, ref)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    out = fn(x, sigma, ref)
    peak = _status_kib("VmHWM")
    del out
    print((peak - before) / 1024.0)


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 8 and sys.argv[1] == "--peak":
        _peak_main(sys.argv[2], *map(int, sys.argv[3:7]), sys.argv[7])
    else:
        raise SystemExit("usage: _stf_peers.py --peak PEER B N D THREADS REGIME")
