"""Triton kernels for the STF target (fastdiff.ops.stf); the `triton` backend.

The algorithm is stf_target_torch's (fastdiff/ops/stf.py), laid out for a GPU:

    l_ik = g_ik - xn_i * inv2s2_i,   g_ik = (2 x_i.r_k - ||r_k||^2) * inv2s2_i + b_ik,   inv2s2 = 1/(2 sigma^2)

Only the shifted logit g is ever formed: the GEMM part 2 x.r - ||r||^2 in fp32
(finite for rows within MAX_SQNORM), scaled by inv2s2 in float64 in the row
kernel (so no sigma down to float32's smallest normal overflows it), plus
b_ik = ref_logw_k, or -inf where ref_labels_k != labels_i (the optional terms,
float64, added where the row kernel reads G); the per-row offset
xn_i * inv2s2_i cancels in the softmax and is put back, in float64, in lse. N is cut into S contiguous splits (S > 1 when B alone gives too few
programs); every split keeps its own online log-sum-exp state, and the host
walks the splits in chunks of Cs reference rows. Per chunk, three launches:

  1. _logits_kernel, grid (B/BM, Cs/BN, S): the fp32 tile 2 x.r - ||r||^2
     by tl.dot over D (tiles BK wide) into G (S, B, Cs).
  2. _row_kernel, grid (B, S): per row and split, in float64: the running lower
     bound m_low on the max logit, the flags (below; marked by a NaN written
     over the entry's G, read back after a barrier), the exact float64
     direct-difference logits of the flagged entries, the new running max m,
     the weights p = exp(g - m) of the unflagged entries (written over G in
     fp32, 0 where flagged), l += sum p, and the flagged entries accumulated in
     float64 straight into ACC64 (S, B, D). Writes the rescale factor
     exp(m_old - m) for 3.
  3. _pv_kernel, grid (B/BM, D/BD, S): ACC32_new = ACC32_old * scale + P @ R_chunk
     (tl.dot over the chunk). Reads one fp32 accumulator and writes the other
     (ping-pong) so autotuning can rerun it.

Then _combine_kernel, grid (B, D/BD), merges the splits by their log-sum-exps
(an empty split has m = -inf and weight 0, never NaN) and writes
t = (sum_s w_s (ACC32_s + ACC64_s)) / (sum_s w_s l_s) and lse.

Memory: O(B*D + N*D + S*B*D + S*B*Cs), S*B*Cs*12 bytes <= CHUNK_BYTES; never
B x N x D.

Flags (precision "highest"). With e_ik a bound on |g~_ik - g_ik| (the GEMM's,
from gemm_gamma(D) plus a margin for the tf32x3 split products and the
kernel's own fp32 rounding, then doubled), an entry is re-evaluated exactly
unless either
  (A) expm1(e) * lever <= ERROR_BUDGET * sigma sqrt(D): its error is small
      whatever its weight (the unflagged A-entries together move t_i by at
      most ERROR_BUDGET, their weights summing to <= 1), or
  (B) g + e - m_low + log(expm1(e)) <= log_budget: its weight is too small
      for its error to matter (stf_target_torch's rule: <= ERROR_BUDGET / N
      each).
So the unflagged entries move t_i by at most ~4 * ERROR_BUDGET = 4e-5 noise
units (two groups; the renormalization of the weights can double each
group's share), within the 1e-4 contract. (A) is not in stf_target_torch, which
re-evaluates everything at large sigma; log(expm1(e)) is evaluated as e for
e > 20 (stf_target_torch's log(expm1(e)) overflows to +inf past e ~ 709 and
then flags every entry of the row). m_low is per split: a split sees only its
own entries, so its m_low is lower and its flags a superset (exact, at worst
slower).

GPU follow-up (unmeasured): between sigma ~5 and ~50 most entries of a row are
flagged (weights spread, fp32 bound above budget), and these kernels re-evaluate
them one by one. The cpu backend (csrc/cpu/stf.cpp) instead predicts such rows up
front from a 64-row probe of ref and computes their logits by the float64
expansion (bound gemm_gamma(D, 2^-53)), skipping the fp32 logits GEMM, with their
weighted sum kept in fp32 where that is provably within budget: ~1.7x the floor
there instead of ~3.8x. The same should pay on Hopper, where float64 tensor-core
GEMMs (DMMA) run at about fp32-SIMT speed: a dense-row float64 logits GEMM at
roughly the cost of the 3xTF32 one. Not implemented or timed here.

Precision modes (operands of both GEMMs; "ieee" everywhere in the interpreter,
which ignores input_precision):
  "highest": tf32x3 on the GPU (3 tensor-core products, ~fp32 accuracy, the
             bound widened for it) + the exact re-evaluation above. The
             accuracy contract err_i <= 1e-4. Verified here only in the
             interpreter (ieee fp32 GEMMs): see tests/test_stf_triton.py.
  "tf32x3":  the same GEMMs, no re-evaluation: saves the float64 pass and
             its memory, not GEMM time (so it will not be 2x faster than
             "highest" unless flags are many). Bounds: PRECISION_BOUNDS.
  "tf32":    1xTF32 GEMMs (10-bit mantissa operands), no re-evaluation.
  "bf16":    bf16 operands (8-bit mantissa), fp32 accumulation, no
             re-evaluation.
Without re-evaluation the expansion's error is amplified by 1/sigma^2: the
faster modes are for large sigma only (see PRECISION_BOUNDS).

Tensor-core sums. Tensor cores truncate (round toward zero) in their fp32
accumulation (Fasi et al. 2021): chained over all of D that one-sided error
outgrows gemm_gamma, a bound for round-to-nearest sums, which the flags rely on.
Triton (3.6 and 3.8) lowers a tf32x3 tl.dot(a, b, acc) as three products summed
from zero on the tensor cores plus one ordinary fp32 add of acc, so each k-tile
is summed apart, as csrc/cuda/stf.cu does by hand; tests/test_triton_aot.py
checks the compiled loop. The "tf32" and "bf16" modes chain acc through the
tensor cores: up to ~(D/8) 2^-23 relative at D = 3072, comparable to their
operands' rounding and not in the CPU-emulated PRECISION_BOUNDS; the GPU run
checks those bounds.

Nothing here has run on a GPU yet: the configs, the split heuristic and
every speed claim are unmeasured (see the issue's GPU checklist).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from fastdiff.ops.stf import CHUNK_BYTES, ERROR_BUDGET, gemm_gamma

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Extra error of a tf32x3 product over an fp32 one, per |x_j r_j|: the dropped
# lo*lo term and the tf32 rounding of the two lo parts, each <= 2^-22 relative
# (Triton rounds the hi part to nearest, 11 bits). 2 x.r doubles it; the inputs'
# own rounding to fp32 (fp64 inputs) adds u.
TF32X3_EXTRA = 2.0 ** -24 * 32.0

# Bounds of the faster modes (no re-evaluation): max over rows of
# err_i = ||t_i - t64_i|| / (sigma_i sqrt(D)), by sigma, on tests/test_stf.py's
# near_duplicate_case (B = 32, N = 512, uniform [-1, 1] data, near-duplicate pairs
# at distance sigma), two seeds. EMULATED ON CPU, not measured on a GPU: the
# operands of both products rounded as the mode rounds them (tf32: round to
# nearest, 10-bit mantissa; bf16: round to nearest; tf32x3: fp32 products),
# everything else exact. The GPU run must confirm them (tests/test_stf_gpu.py
# checks the GPU kernels against 2x these figures).
#
#   sigma     0.002   0.02    0.1     0.5     1       5       80
#   D = 3072
#   tf32x3    1.6e-2  3.7e-3  1.2e-4  3.5e-6  1.3e-6  4.5e-8  8.7e-10
#   tf32      5.6e-2  1.8e-2  6.5e-3  3.9e-4  1.4e-4  8.1e-5  3.1e-7
#   bf16      4.4e-1  4.6e-2  1.7e-2  3.2e-3  1.1e-3  2.2e-4  3.5e-6
#   D = 12288
#   tf32x3    8.0e-3  4.7e-3  3.6e-4  1.8e-5  3.1e-6  1.5e-7  2.5e-10
#   tf32      5.4e-2  1.0e-2  5.3e-3  4.1e-4  1.2e-4  2.8e-5  3.7e-7
#   bf16      4.3e-1  4.4e-2  1.2e-2  3.1e-3  9.3e-4  2.0e-4  3.1e-6
#
# So "tf32x3" meets the 1e-4 contract for sigma >= 0.5 and "tf32" ~1e-3 there;
# below sigma ~ 0.1 only "highest" is exact.
PRECISION_BOUNDS = {   # (sigma, D) -> bound, the table above (D = 3072 and 12288)
    "tf32x3": {3072: {0.002: 1.6e-2, 0.02: 3.7e-3, 0.1: 1.2e-4, 0.5: 3.5e-6, 1.0: 1.3e-6, 5.0: 4.5e-8, 80.0: 8.7e-10},
               12288: {0.002: 8.0e-3, 0.02: 4.7e-3, 0.1: 3.6e-4, 0.5: 1.8e-5, 1.0: 3.1e-6, 5.0: 1.5e-7,
                       80.0: 2.5e-10}},
    "tf32": {3072: {0.002: 5.6e-2, 0.02: 1.8e-2, 0.1: 6.5e-3, 0.5: 3.9e-4, 1.0: 1.4e-4, 5.0: 8.1e-5, 80.0: 3.1e-7},
             12288: {0.002: 5.4e-2, 0.02: 1.0e-2, 0.1: 5.3e-3, 0.5: 4.1e-4, 1.0: 1.2e-4, 5.0: 2.8e-5, 80.0: 3.7e-7}},
    "bf16": {3072: {0.002: 4.4e-1, 0.02: 4.6e-2, 0.1: 1.7e-2, 0.5: 3.2e-3, 1.0: 1.1e-3, 5.0: 2.2e-4, 80.0: 3.5e-6},
             12288: {0.002: 4.3e-1, 0.02: 4.4e-2, 0.1: 1.2e-2, 0.5: 3.1e-3, 1.0: 9.3e-4, 5.0: 2.0e-4, 80.0: 3.1e-6}},
}

_DOT_PRECISION = {"highest": "tf32x3", "tf32x3": "tf32x3", "tf32": "tf32", "bf16": "ieee"}

# Granularity of split boundaries (a multiple of every BN) and one kernel
# config per kernel under the interpreter (it is slow and tuning is meaningless).
_ALIGN = 16 if INTERPRET else 128


def _configs(interp, full):
    return [triton.Config(interp, num_warps=4, num_stages=1)] if INTERPRET else full


_LOGIT_CONFIGS = _configs(dict(BM=16, BN=16, BK=16), [
    triton.Config(dict(BM=128, BN=128, BK=32), num_warps=8, num_stages=3),
    triton.Config(dict(BM=128, BN=64, BK=32), num_warps=4, num_stages=4),
    triton.Config(dict(BM=64, BN=128, BK=32), num_warps=4, num_stages=4),
    triton.Config(dict(BM=64, BN=64, BK=32), num_warps=4, num_stages=4),
    triton.Config(dict(BM=128, BN=128, BK=16), num_warps=8, num_stages=4),
])
_PV_CONFIGS = _configs(dict(BM=16, BD=16, BK=16), [
    triton.Config(dict(BM=128, BD=128, BK=32), num_warps=8, num_stages=3),
    triton.Config(dict(BM=64, BD=128, BK=32), num_warps=4, num_stages=4),
    triton.Config(dict(BM=128, BD=64, BK=32), num_warps=4, num_stages=4),
    triton.Config(dict(BM=64, BD=64, BK=32), num_warps=4, num_stages=4),
])
_MAX_BM = max(c.kwargs["BM"] for c in _PV_CONFIGS)
# The row kernel: BLK entries per step, [BLK, BD] float64 tiles for the flagged entries'
# direct differences, BV-wide vectors to rescale ACC64; 4 warps. Sized by ptxas -v for sm_90
# (triton 3.6 and 3.8; tests/test_triton_aot.py): 64/16 uses 96 registers and spills at most
# 24 bytes; the former 128/64 used 255 and spilled ~1.2 KB per thread. Not yet timed on a GPU.
_ROW_BLK, _ROW_BD, _ROW_BV = (16, 16, 16) if INTERPRET else (64, 16, 512)
_COMBINE_BD = 16 if INTERPRET else 256


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------

@triton.jit
def _sqnorm_kernel(X, OUT, D, BD: tl.constexpr):
    """OUT[i] = sum_j X[i, j]^2 in float64."""
    i = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BD], tl.float64)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        v = tl.load(X + i * D + dd, mask=dd < D, other=0.0).to(tl.float64)
        acc += v * v
    tl.store(OUT + i, tl.sum(acc, axis=0))


@triton.autotune(configs=_LOGIT_CONFIGS, key=["B", "Cs", "D", "PREC", "BF16"])
@triton.jit
def _logits_kernel(X, R, RN32, G, B, N, D, Cs, span, j0,
                   PREC: tl.constexpr, BF16: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    lc = pid_n * BN + tl.arange(0, BN)
    col = s * span + j0 + lc
    rmask = rows < B
    cmask = (lc < Cs) & (j0 + lc < span) & (col < N)
    xp = X + rows.to(tl.int64)[:, None] * D
    rp = R + col.to(tl.int64)[None, :] * D
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < D
        a = tl.load(xp + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0).to(tl.float32)
        b = tl.load(rp + kk[:, None], mask=km[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if BF16:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, input_precision=PREC)
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)
    rn = tl.load(RN32 + col, mask=cmask, other=0.0)
    g = 2.0 * acc - rn[None, :]
    gp = G + (s * B + rows).to(tl.int64)[:, None] * Cs + lc[None, :]
    tl.store(gp, g, mask=rmask[:, None] & (lc < Cs)[None, :])


@triton.jit
def _err_bound(rn, rnorm, xnorm, inv2s2, gamma):
    return gamma * (rn + 2.0 * xnorm * rnorm) * inv2s2


@triton.jit
def _logit(gbase, lc, col, valid, inv2s2, lab, RLAB, LW, HAS_LAB: tl.constexpr, HAS_LW: tl.constexpr):
    """The chunk's shifted float64 logits g_ik = G * inv2s2 + b_ik (NaN where G holds a flag;
    a flagged entry's label always matches, a -inf entry is never flagged)."""
    g = tl.load(gbase + lc, mask=valid, other=0.0).to(tl.float64) * inv2s2
    if HAS_LW:
        g += tl.load(LW + col, mask=valid, other=0.0)
    if HAS_LAB:
        g = tl.where(tl.load(RLAB + col, mask=valid, other=0) == lab, g, float("-inf"))
    return g


@triton.jit
def _flags(g, e, ml, lb, lbe, valid):
    # log(expm1(e)), stable at both ends (e >= 0).
    small = e < 1e-3
    big = e > 20.0
    es = tl.where(small | big, 1.0, e)
    le = tl.where(big, e, tl.where(small, tl.log(tl.maximum(e, 1e-300)) + 0.5 * e, tl.log(tl.exp(es) - 1.0)))
    return valid & (g + e - ml + le > lb) & (le > lbe)


@triton.jit
def _row_kernel(G, E64, X, R, RN, RNORM, XN, XNORM, INV2S2, LB, LBE,
                M, ML, L, L64, SCALE, ACC64, LAB, RLAB, LW,
                B, N, D, Cs, span, j0, gamma,
                EXACT: tl.constexpr, HAS_LAB: tl.constexpr, HAS_LW: tl.constexpr,
                BLK: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    idx = s * B + b
    inv2s2 = tl.load(INV2S2 + b)
    xnorm = tl.load(XNORM + b)
    xn = tl.load(XN + b)
    lb = tl.load(LB + b)
    lbe = tl.load(LBE + b)
    m_old = tl.load(M + idx)
    ml = tl.load(ML + idx)
    gbase = G + idx.to(tl.int64) * Cs
    ebase = E64 + idx.to(tl.int64) * Cs
    xrow = X + b.to(tl.int64) * D
    NEG = float("-inf")
    lab = 0
    if HAS_LAB:
        lab = tl.load(LAB + b)

    # pass A: the running lower bound on the split's max logit
    if EXACT:
        for c0 in range(0, Cs, BLK):
            lc = c0 + tl.arange(0, BLK)
            col = s * span + j0 + lc
            valid = (lc < Cs) & (j0 + lc < span) & (col < N)
            g = _logit(gbase, lc, col, valid, inv2s2, lab, RLAB, LW, HAS_LAB, HAS_LW)
            e = _err_bound(tl.load(RN + col, mask=valid, other=0.0), tl.load(RNORM + col, mask=valid, other=0.0),
                           xnorm, inv2s2, gamma)
            ml = tl.maximum(ml, tl.max(tl.where(valid, g - e, NEG), axis=0))

    # pass B: flags, exact logits of the flagged entries, the new max
    mx = m_old
    for c0 in range(0, Cs, BLK):
        lc = c0 + tl.arange(0, BLK)
        col = s * span + j0 + lc
        valid = (lc < Cs) & (j0 + lc < span) & (col < N)
        g = _logit(gbase, lc, col, valid, inv2s2, lab, RLAB, LW, HAS_LAB, HAS_LW)
        if EXACT:
            e = _err_bound(tl.load(RN + col, mask=valid, other=0.0), tl.load(RNORM + col, mask=valid, other=0.0),
                           xnorm, inv2s2, gamma)
            flag = _flags(g, e, ml, lb, lbe, valid)
            mx = tl.maximum(mx, tl.max(tl.where(valid & ~flag, g, NEG), axis=0))
            # Pass C reads a NaN in G as the flag (G is finite otherwise); an entry whose
            # G is NaN already (NaN data, value checks off) gets a NaN exact logit too.
            bad = valid & (g != g) & ~flag
            tl.store(gbase + lc, tl.full([BLK], float("nan"), tl.float32), mask=flag | bad)
            tl.store(ebase + lc, tl.full([BLK], float("nan"), tl.float64), mask=bad)
            if tl.sum(flag.to(tl.int32), axis=0) > 0:
                col64 = col.to(tl.int64)
                dist = tl.zeros([BLK], tl.float64)
                for d0 in range(0, D, BD):
                    dd = d0 + tl.arange(0, BD)
                    dm = dd < D
                    xv = tl.load(xrow + dd, mask=dm, other=0.0).to(tl.float64)
                    rv = tl.load(R + col64[:, None] * D + dd[None, :], mask=flag[:, None] & dm[None, :],
                                 other=0.0).to(tl.float64)
                    diff = xv[None, :] - rv
                    dist += tl.sum(diff * diff, axis=1)
                ge = (xn - dist) * inv2s2
                if HAS_LW:
                    ge += tl.load(LW + col, mask=flag, other=0.0)
                tl.store(ebase + lc, ge, mask=flag)
                mx = tl.maximum(mx, tl.max(tl.where(flag, ge, NEG), axis=0))
        else:
            mx = tl.maximum(mx, tl.max(tl.where(valid, g, NEG), axis=0))
    m_new = mx
    # Triton orders only shared memory: a global value written and read back in one
    # program needs a barrier, since the two accesses may get different thread layouts
    # (triton-lang/triton#10924). Here: E64 and the NaN flags in G, read by pass C, and
    # ACC64, read-modify-written by the rescale and by each flagged block of pass C.
    tl.debug_barrier()

    # Rescale the running state. m_new = -inf means the split has seen nothing yet (or only
    # -inf logits: exp(g - m_ref) is then 0, never exp(-inf - -inf)).
    scale = tl.where(m_new == NEG, 1.0, tl.exp(m_old - m_new))
    m_ref = tl.where(m_new == NEG, 0.0, m_new)
    l_acc = tl.load(L + idx) * scale
    l64_old = tl.load(L64 + idx)
    l64 = l64_old * scale
    if EXACT:
        if l64_old > 0.0:
            if scale != 1.0:
                for d0 in range(0, D, BV):
                    dd = d0 + tl.arange(0, BV)
                    dm = dd < D
                    ap = ACC64 + idx.to(tl.int64) * D + dd
                    tl.store(ap, tl.load(ap, mask=dm, other=0.0) * scale, mask=dm)
                tl.debug_barrier()

    # pass C: weights; unflagged into P (over G), flagged into ACC64 in float64
    for c0 in range(0, Cs, BLK):
        lc = c0 + tl.arange(0, BLK)
        col = s * span + j0 + lc
        valid = (lc < Cs) & (j0 + lc < span) & (col < N)
        g = _logit(gbase, lc, col, valid, inv2s2, lab, RLAB, LW, HAS_LAB, HAS_LW)
        if EXACT:
            flag = valid & (g != g)     # flagged in pass B
            keep = valid & ~flag
        else:
            keep = valid
        p = tl.where(keep, tl.exp(g - m_ref), 0.0)
        tl.store(gbase + lc, p.to(tl.float32), mask=lc < Cs)
        l_acc += tl.sum(p, axis=0)
        if EXACT:
            if tl.sum(flag.to(tl.int32), axis=0) > 0:
                ge = tl.load(ebase + lc, mask=flag, other=0.0)
                w = tl.where(flag, tl.exp(ge - m_ref), 0.0)
                l_acc += tl.sum(w, axis=0)
                l64 += tl.sum(w, axis=0)
                col64 = col.to(tl.int64)
                for d0 in range(0, D, BD):
                    dd = d0 + tl.arange(0, BD)
                    dm = dd < D
                    rv = tl.load(R + col64[:, None] * D + dd[None, :], mask=flag[:, None] & dm[None, :],
                                 other=0.0).to(tl.float64)
                    ap = ACC64 + idx.to(tl.int64) * D + dd
                    tl.store(ap, tl.load(ap, mask=dm, other=0.0) + tl.sum(w[:, None] * rv, axis=0), mask=dm)
                tl.debug_barrier()

    tl.store(M + idx, m_new)
    tl.store(ML + idx, ml)
    tl.store(L + idx, l_acc)
    tl.store(L64 + idx, l64)
    tl.store(SCALE + idx, scale.to(tl.float32))


@triton.autotune(configs=_PV_CONFIGS, key=["B", "Cs", "D", "PREC", "BF16"])
@triton.jit
def _pv_kernel(P, R, SCALE, ACC_IN, ACC_OUT, B, N, D, Cs, span, j0,
               PREC: tl.constexpr, BF16: tl.constexpr, OFF64: tl.constexpr,
               BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    s = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    dd = pid_d * BD + tl.arange(0, BD)
    rmask = rows < B
    dm = dd < D
    prow = P + (s * B + rows).to(tl.int64)[:, None] * Cs
    acc = tl.zeros([BM, BD], tl.float32)
    for k0 in range(0, Cs, BK):
        lk = k0 + tl.arange(0, BK)
        col = s * span + j0 + lk
        kv = (lk < Cs) & (j0 + lk < span) & (col < N)
        p = tl.load(prow + lk[None, :], mask=rmask[:, None] & (lk < Cs)[None, :], other=0.0)
        r = tl.load(R + col.to(tl.int64)[:, None] * D + dd[None, :], mask=kv[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        if BF16:
            acc = tl.dot(p.to(tl.bfloat16), r.to(tl.bfloat16), acc, input_precision=PREC)
        else:
            acc = tl.dot(p, r, acc, input_precision=PREC)
    scale = tl.load(SCALE + s * B + rows, mask=rmask, other=1.0)
    # The tile's offsets as one 64-bit base and 32-bit offsets within the tile (64-bit only
    # where BM * D could pass int32: OFF64): an int64 offset per element, live next to acc
    # and old, made ptxas spill ~0.5 KB per thread.
    base = (s * B + pid_m * BM).to(tl.int64) * D + pid_d * BD
    tile_rows = tl.arange(0, BM)
    if OFF64:
        tile_rows = tile_rows.to(tl.int64)
    off = tile_rows[:, None] * D + tl.arange(0, BD)[None, :]
    mask = rmask[:, None] & dm[None, :]
    old = tl.load(ACC_IN + base + off, mask=mask, other=0.0)
    tl.store(ACC_OUT + base + off, old * scale[:, None] + acc, mask=mask)


@triton.jit
def _combine_kernel(M, L, ACC32, ACC64, XN, INV2S2, T, LSE, B, D, S,
                    HAS64: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """Merges the S split partials of row b by their log-sum-exps."""
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    NEG = float("-inf")
    si = tl.arange(0, BS)
    sm = si < S
    m = tl.load(M + si * B + b, mask=sm, other=NEG)
    mmax = tl.max(m, axis=0)
    # An empty split (m = -inf) weighs 0; exp(-inf - -inf) would be NaN.
    w = tl.where(m == NEG, 0.0, tl.exp(m - mmax))
    ltot = tl.sum(w * tl.load(L + si * B + b, mask=sm, other=0.0), axis=0)
    dd = pid_d * BD + tl.arange(0, BD)
    dm = dd < D
    off = (si * B + b).to(tl.int64)[:, None] * D + dd[None, :]
    mask = sm[:, None] & dm[None, :]
    part = tl.load(ACC32 + off, mask=mask, other=0.0).to(tl.float64)
    if HAS64:
        part += tl.load(ACC64 + off, mask=mask, other=0.0)
    num = tl.sum(w[:, None] * part, axis=0)
    # ltot = 0 only if every split is empty; a NaN (NaN data with value checks off) stays NaN
    t = tl.where(ltot == 0.0, 0.0, num / tl.where(ltot == 0.0, 1.0, ltot))
    if T.dtype.element_ty == tl.float64:
        tl.store(T + b.to(tl.int64) * D + dd, t, mask=dm)
    else:
        # via fp32: the interpreter's fp64 -> bf16 conversion is wrong (triton 3.8)
        tl.store(T + b.to(tl.int64) * D + dd, t.to(tl.float32).to(T.dtype.element_ty), mask=dm)
    if pid_d == 0:
        offset = tl.load(XN + b) * tl.load(INV2S2 + b)
        lse = tl.where(ltot == 0.0, NEG, mmax + tl.log(tl.where(ltot == 0.0, 1.0, ltot)) - offset)
        tl.store(LSE + b, lse)


# ----------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sqnorms(a: torch.Tensor) -> torch.Tensor:
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    _sqnorm_kernel[(a.shape[0],)](a, out, a.shape[1], BD=128 if not INTERPRET else 16)
    return out


def _default_splits(B: int, N: int, D: int, device: torch.device) -> int:
    """Splits over N so that the P @ R kernel has about two programs per SM."""
    if INTERPRET or device.type != "cuda":
        return 1
    programs = triton.cdiv(B, 128) * triton.cdiv(D, 128)
    want = triton.cdiv(2 * _sm_count(device.index or 0), programs)
    return int(max(1, min(want, triton.cdiv(N, 512), 16)))


def combine(m, l, acc32, acc64, xn, inv2s2, t_out, lse_out):
    """Merges split partials (m, l: (S, B) float64; acc32 (S, B, D) fp32, acc64
    (S, B, D) float64 or None) into t_out (B, D) and lse_out (B,)."""
    S, B = m.shape
    D = acc32.shape[2]
    has64 = acc64 is not None
    _combine_kernel[(B, triton.cdiv(D, _COMBINE_BD))](
        m, l, acc32, acc64 if has64 else acc32, xn, inv2s2, t_out, lse_out, B, D, S,
        HAS64=has64, BS=max(2, triton.next_power_of_2(S)), BD=_COMBINE_BD)


def stf_target_splits(x, sigma, ref, precision, t_out, lse_out, splits=None, chunk=None, labels=None,
                      ref_labels=None, ref_logw=None):
    """stf_target_triton with the split count and chunk width (per split) exposed for tests."""
    B, D = x.shape
    N = ref.shape[0]
    dev = x.device
    exact = precision == "highest"
    bf16 = precision == "bf16" and not INTERPRET
    prec = "ieee" if INTERPRET else _DOT_PRECISION[precision]
    off64 = D * _MAX_BM >= 2 ** 31      # the P @ R tiles' offsets could pass int32

    S = int(splits) if splits else _default_splits(B, N, D, dev)
    S = max(1, min(S, N))
    span = triton.cdiv(triton.cdiv(N, S), _ALIGN) * _ALIGN
    per_col = B * S * (12 if exact else 4)
    Cs = int(chunk) if chunk else max(_ALIGN, (CHUNK_BYTES // per_col) // _ALIGN * _ALIGN)
    Cs = min(Cs, span)
    n_chunks = triton.cdiv(span, Cs)

    # per-row and per-reference constants, float64, on the device (no host sync)
    s64 = sigma.double()
    inv2s2 = 0.5 / (s64 * s64)
    xn = _sqnorms(x)
    xnorm = xn.sqrt()
    rn = _sqnorms(ref)
    rnorm = rn.sqrt()
    lever = (2.0 * rnorm.max()).clamp_min(1e-30)
    lbe = math.log(ERROR_BUDGET) + torch.log(s64 * math.sqrt(D)) - torch.log(lever)
    lb = lbe - math.log(N)
    gamma = 2.0 * (gemm_gamma(D) + TF32X3_EXTRA)     # x2: the kernel's own fp32 rounding
    rn32 = rn.float()

    G = torch.empty(S, B, Cs, dtype=torch.float32, device=dev)
    E64 = torch.empty(S, B, Cs, dtype=torch.float64, device=dev) if exact else G
    m = torch.full((S, B), -math.inf, dtype=torch.float64, device=dev)
    ml = torch.full((S, B), -math.inf, dtype=torch.float64, device=dev)
    l = torch.zeros(S, B, dtype=torch.float64, device=dev)
    l64 = torch.zeros(S, B, dtype=torch.float64, device=dev)
    scale = torch.empty(S, B, dtype=torch.float32, device=dev)
    acc = [torch.zeros(S, B, D, dtype=torch.float32, device=dev),
           torch.empty(S, B, D, dtype=torch.float32, device=dev)]
    acc64 = torch.zeros(S, B, D, dtype=torch.float64, device=dev) if exact else None
    has_lab, has_lw = labels is not None, ref_logw is not None

    for j in range(n_chunks):
        j0 = j * Cs
        _logits_kernel[lambda meta: (triton.cdiv(B, meta["BM"]), triton.cdiv(Cs, meta["BN"]), S)](
            x, ref, rn32, G, B, N, D, Cs, span, j0, PREC=prec, BF16=bf16)
        _row_kernel[(B, S)](
            G, E64, x, ref, rn, rnorm, xn, xnorm, inv2s2, lb, lbe, m, ml, l, l64, scale,
            acc64 if exact else G, labels if has_lab else m, ref_labels if has_lab else m,
            ref_logw if has_lw else m, B, N, D, Cs, span, j0, gamma,
            EXACT=exact, HAS_LAB=has_lab, HAS_LW=has_lw, BLK=_ROW_BLK, BD=_ROW_BD, BV=_ROW_BV, num_warps=4)
        _pv_kernel[lambda meta: (triton.cdiv(B, meta["BM"]), triton.cdiv(D, meta["BD"]), S)](
            G, ref, scale, acc[0], acc[1], B, N, D, Cs, span, j0, PREC=prec, BF16=bf16, OFF64=off64)
        acc.reverse()
    combine(m, l, acc[0], acc64, xn, inv2s2, t_out, lse_out)


def stf_target_triton(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor, precision: str,
                      t_out: torch.Tensor, lse_out: torch.Tensor, labels: torch.Tensor | None = None,
                      ref_labels: torch.Tensor | None = None, ref_logw: torch.Tensor | None = None) -> None:
    """The `triton` backend of fastdiff.stf_target (backend contract: see fastdiff/ops/stf.py)."""
    stf_target_splits(x, sigma, ref, precision, t_out, lse_out, labels=labels, ref_labels=ref_labels,
                      ref_logw=ref_logw)
