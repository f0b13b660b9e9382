// CUDA kernels for the STF target (the `cuda` backend of fastdiff.stf_target).
//
// The same algorithm and layout as kernels/stf.py (read its docstring first):
// per chunk of Cs reference rows in each of S splits,
//   logits_kernel  G = 2 x.r - ||r||^2               tensor-core GEMM (WMMA tf32, 3xTF32 for
//                                                    "highest"/"tf32x3"), fp32 accumulation
//   row_kernel     per (row, split), float64: the logits g = G * inv2s2 + b_ik (b_ik: ref_logw,
//                  -inf across labels; scaled in float64, so no normal sigma overflows them),
//                  m_low, flags (never for a -inf entry), exact direct-difference logits of
//                  the flagged entries, running max, weights (over G), flagged entries
//                  accumulated in float64 into acc64
//   pv_kernel      acc_out = acc_in * scale + P @ R_chunk   tensor-core GEMM, ping-pong buffers
// then combine_kernel merges the splits by their log-sum-exps (empty split: weight 0).
//
// No torch headers here (they cost ~85 s of nvcc time); stf_launch.cpp registers the op.
// Built for sm_80+ (WMMA tf32); below sm_80 the tile products fall back to FFMA.
// Mode "bf16" rounds the operands to bf16 and multiplies them on the tf32 MMA:
// bf16's accuracy (exact products of bf16 values), tf32's speed.
// Tiles are 64 x 64 x 16, loaded through registers (no cp.async pipeline):
// lean, not tuned; the GPU benchmarks decide whether it needs more.
// Nothing in this file has run on a GPU yet.
// GPU follow-up (unmeasured): at sigma ~5..50 most entries are flagged and row_kernel
// re-evaluates them one by one. The cpu backend decides such rows dense up front (a probe of
// ref) and takes their logits from the float64 expansion instead, skipping the fp32 GEMM
// (csrc/cpu/stf.cpp; kernels/stf.py's docstring has the reasoning). On Hopper float64
// tensor-core GEMMs run at about fp32-SIMT speed, so the same should pay here.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cfloat>
#include <cmath>

#include "cuda/stf.h"

namespace fastdiff_cuda {
namespace {

constexpr int kAlign = 64;       // split boundaries and Cs are multiples of this
constexpr int kBM = 64, kBN = 64, kBK = 16;   // GEMM block tile; 4 warps, 32 x 32 each
constexpr int kGemmThreads = 128;
constexpr int kRowThreads = 256;
constexpr int kCombineThreads = 256;
constexpr int kMaxSplits = 16;

// ---------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ double to_double(T v) { return static_cast<double>(v); }

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
template <bool kMax>
__device__ double block_reduce(double v, double* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // sh may still be read by a previous reduction
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  double r = kMax ? -INFINITY : 0.0;
  for (int w = 0; w < nw; ++w) r = kMax ? fmax(r, sh[w]) : r + sh[w];
  return r;
}

// log(expm1(e)) for e >= 0, stable at both ends; -inf for e = 0.
__device__ __forceinline__ double log_expm1(double e) {
  if (e > 20.0) return e;
  if (e < 1e-3) return log(fmax(e, 1e-300)) + 0.5 * e;
  return log(expm1(e));
}

// Appends this round's flagged entries (one candidate per thread) to flist in thread
// order and returns how many there are; every thread must call it. Thread order (a
// ballot and a prefix over the warps, not an atomic counter) keeps the float64 sums
// over the flagged entries in a fixed order, so results are bitwise reproducible.
__device__ __forceinline__ int compact_flags(bool f, int lc, int* flist, int* wcount) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const unsigned bal = __ballot_sync(0xffffffffu, f);
  if (lane == 0) wcount[wid] = __popc(bal);
  __syncthreads();  // also: every read of flist from the previous round is done
  int before = 0, total = 0;
  for (int w = 0; w < nw; ++w) {
    before += w < wid ? wcount[w] : 0;
    total += wcount[w];
  }
  if (f) flist[before + __popc(bal & ((1u << lane) - 1u))] = lc;
  __syncthreads();  // flist complete; wcount may be rewritten by the next call
  return total;
}

// Whether an entry's bounded fp32 error could matter (kernels/stf.py, "Flags").
__device__ __forceinline__ bool flagged(double g, double e, double ml, double lb, double lbe) {
  const double le = log_expm1(e);
  return (g + e - ml + le > lb) && (le > lbe);
}

// ---------------------------------------------------------------------------
// norms and per-row constants
// ---------------------------------------------------------------------------

template <typename T>
__global__ void sqnorm_kernel(const T* __restrict__ a, int D, double* __restrict__ out) {
  __shared__ double sh[32];
  const T* row = a + static_cast<long long>(blockIdx.x) * D;
  double s = 0.0;
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    const double v = to_double(row[j]);
    s += v * v;
  }
  s = block_reduce<false>(s, sh);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

__global__ void ref_consts_kernel(const double* __restrict__ rn, int N, double* __restrict__ rnorm,
                                  float* __restrict__ rn32, double* __restrict__ lever) {
  __shared__ double sh[32];
  double mx = 0.0;
  for (int k = threadIdx.x; k < N; k += blockDim.x) {
    const double r = sqrt(rn[k]);
    rnorm[k] = r;
    rn32[k] = static_cast<float>(rn[k]);
    mx = fmax(mx, r);
  }
  mx = block_reduce<true>(mx, sh);
  if (threadIdx.x == 0) lever[0] = fmax(2.0 * mx, 1e-30);
}

__global__ void row_consts_kernel(const float* __restrict__ sigma, const double* __restrict__ xn, int B, int D,
                                  int N, double log_error_budget, const double* __restrict__ lever,
                                  double* __restrict__ xnorm, double* __restrict__ inv2s2,
                                  double* __restrict__ lb, double* __restrict__ lbe) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B) return;
  const double s = sigma[i];
  const double inv = 0.5 / (s * s);
  xnorm[i] = sqrt(xn[i]);
  inv2s2[i] = inv;
  // (A): an entry is exempt if expm1(e) * lever <= ERROR_BUDGET * sigma sqrt(D);
  // (B): or if its weight-scaled error is <= that / N.
  const double e_abs = log_error_budget + log(s * sqrt(static_cast<double>(D))) - log(lever[0]);
  lbe[i] = e_abs;
  lb[i] = e_abs - log(static_cast<double>(N));
}

__global__ void init_state_kernel(int n, double* m, double* ml, double* l, double* l64) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  m[i] = -INFINITY;
  ml[i] = -INFINITY;
  l[i] = 0.0;
  l64[i] = 0.0;
}

// ---------------------------------------------------------------------------
// the tile product C[64 x 64] = A[64 x K] B[K x 64] on tensor cores
// ---------------------------------------------------------------------------

// Rounds an operand as the mode says before it reaches shared memory.
template <int kMode>
__device__ __forceinline__ float operand(float v) {
  if (kMode == kBf16) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

struct GemmSmem {
  float a[kBM][kBK + 4];
  float b[kBK][kBN + 4];
};

// Accumulates the block's 64 x 64 tile; loadA(m, k) and loadB(k, n) return 0 outside.
// kBKFast: B's memory is contiguous along k (ref^T in logits_kernel), so consecutive
// threads load consecutive k. Leaves the result in out[64][kBN + 4] (shared), synchronized.
template <int kMode, bool kBKFast, typename LA, typename LB>
__device__ void gemm_tile(int K, LA loadA, LB loadB, GemmSmem& sm, float (*out)[kBN + 4]) {
  const int tid = threadIdx.x;
#if __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  const int warp = tid >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
#else
  // FFMA fallback: each thread owns a 4 x 8 patch of the 64 x 64 tile.
  const int pm = (tid >> 3) * 4, pn = (tid & 7) * 8;
  float acc[4][8] = {};
#endif
  for (int k0 = 0; k0 < K; k0 += kBK) {
    for (int e = tid; e < kBM * kBK; e += kGemmThreads) {
      const int m = e / kBK, k = e % kBK;
      sm.a[m][k] = operand<kMode>(loadA(m, k0 + k));
    }
    for (int e = tid; e < kBK * kBN; e += kGemmThreads) {
      const int k = kBKFast ? e % kBK : e / kBN, n = kBKFast ? e / kBK : e % kBN;
      sm.b[k][n] = operand<kMode>(loadB(k0 + k, n));
    }
    __syncthreads();
#if __CUDA_ARCH__ >= 800
    // Each k-tile is summed on the tensor cores in a fresh fragment and added to acc by IEEE
    // fp32 adds: tensor cores were measured to truncate (round toward zero) in their fp32
    // accumulation (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021), a one-sided
    // error that would grow with K (3 MMAs per 8 columns in tf32x3) past gemm_gamma, a bound
    // measured on round-to-nearest GEMMs. Here the tensor cores only ever sum 16 columns.
    // tests/test_stf_gpu.py (test_gemm_error_within_the_flag_bound) measures it on the GPU.
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> part[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(part[i][j], 0.0f);
    for (int kk = 0; kk < kBK; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> ah[2], al[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> bh[2], bl[2];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(ah[i], &sm.a[wm + 16 * i][kk], kBK + 4);
        wmma::load_matrix_sync(bh[i], &sm.b[kk][wn + 16 * i], kBN + 4);
        for (int t = 0; t < ah[i].num_elements; ++t) {
          const float v = ah[i].x[t];
          ah[i].x[t] = wmma::__float_to_tf32(v);
          al[i].x[t] = wmma::__float_to_tf32(v - ah[i].x[t]);
        }
        for (int t = 0; t < bh[i].num_elements; ++t) {
          const float v = bh[i].x[t];
          bh[i].x[t] = wmma::__float_to_tf32(v);
          bl[i].x[t] = wmma::__float_to_tf32(v - bh[i].x[t]);
        }
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
          if (kMode == kTf32x3) {  // small products first: lo*hi + hi*lo + hi*hi
            wmma::mma_sync(part[i][j], al[i], bh[j], part[i][j]);
            wmma::mma_sync(part[i][j], ah[i], bl[j], part[i][j]);
          }
          wmma::mma_sync(part[i][j], ah[i], bh[j], part[i][j]);
        }
    }
    for (int i = 0; i < 2; ++i)  // accumulator fragments of one shape share their element layout
      for (int j = 0; j < 2; ++j)
        for (int t = 0; t < acc[i][j].num_elements; ++t) acc[i][j].x[t] += part[i][j].x[t];
#else
    for (int k = 0; k < kBK; ++k)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(sm.a[pm + i][k], sm.b[k][pn + j], acc[i][j]);
#endif
    __syncthreads();
  }
#if __CUDA_ARCH__ >= 800
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&out[wm + 16 * i][wn + 16 * j], acc[i][j], kBN + 4, wmma::mem_row_major);
#else
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 8; ++j) out[pm + i][pn + j] = acc[i][j];
#endif
  __syncthreads();
}

// ---------------------------------------------------------------------------
// the three per-chunk kernels
// ---------------------------------------------------------------------------

struct ChunkGeom {
  int B, N, D, Cs, span, j0;
  // global reference row of local column lc in split s, or -1 if outside the split or N
  __device__ __forceinline__ int col(int s, int lc) const {
    const int c = s * span + j0 + lc;
    return (lc < Cs && j0 + lc < span && c < N) ? c : -1;
  }
};

template <int kMode, typename T>
__global__ void __launch_bounds__(kGemmThreads) logits_kernel(const T* __restrict__ x, const T* __restrict__ ref,
                                                              const float* __restrict__ rn32,
                                                              float* __restrict__ G, ChunkGeom q) {
  __shared__ __align__(32) GemmSmem sm;
  __shared__ __align__(32) float out[kBM][kBN + 4];
  const int s = blockIdx.z, r0 = blockIdx.y * kBM, c0 = blockIdx.x * kBN;
  const int D = q.D;
  auto loadA = [&](int m, int k) -> float {
    const int row = r0 + m;
    return (row < q.B && k < D) ? static_cast<float>(x[static_cast<long long>(row) * D + k]) : 0.0f;
  };
  auto loadB = [&](int k, int n) -> float {
    const int c = q.col(s, c0 + n);
    return (c >= 0 && k < D) ? static_cast<float>(ref[static_cast<long long>(c) * D + k]) : 0.0f;
  };
  gemm_tile<kMode, true>(D, loadA, loadB, sm, out);
  for (int e = threadIdx.x; e < kBM * kBN; e += kGemmThreads) {
    const int m = e / kBN, n = e % kBN, row = r0 + m, lc = c0 + n;
    if (row >= q.B || lc >= q.Cs) continue;
    const int c = q.col(s, lc);
    const float rn = c >= 0 ? rn32[c] : 0.0f;
    G[(static_cast<long long>(s) * q.B + row) * q.Cs + lc] = 2.0f * out[m][n] - rn;
  }
}

template <bool kExact, typename T>
__global__ void __launch_bounds__(kRowThreads) row_kernel(StfArgs a, ChunkGeom q) {
  __shared__ double sh[32];
  __shared__ int flist[kRowThreads];
  __shared__ int wcount[kRowThreads / 32];
  const int b = blockIdx.x, s = blockIdx.y, tid = threadIdx.x;
  const int idx = s * q.B + b;
  const int D = q.D;
  const T* x = static_cast<const T*>(a.x) + static_cast<long long>(b) * D;
  const T* ref = static_cast<const T*>(a.ref);
  float* g = a.G + static_cast<long long>(idx) * q.Cs;
  double* e64 = kExact ? a.E64 + static_cast<long long>(idx) * q.Cs : nullptr;
  double* acc64 = kExact ? a.acc64 + static_cast<long long>(idx) * D : nullptr;
  const double inv2s2 = a.inv2s2[b], xnorm = a.xnorm[b], xn = a.xn[b], lb = a.lb[b], lbe = a.lbe[b];
  const double m_old = a.m[idx];
  double ml = a.ml[idx];
  auto err = [&](int c) { return a.gamma * (a.rn[c] + 2.0 * xnorm * a.rnorm[c]) * inv2s2; };
  const long long lab = a.labels ? a.labels[b] : 0;
  // the float64 logit of reference row c from its G entry (NaN stays NaN: a flag, or NaN data)
  auto logit = [&](float gv, int c) {
    double v = static_cast<double>(gv) * inv2s2;
    if (a.ref_logw) v += a.ref_logw[c];
    if (a.labels && a.ref_labels[c] != lab) v = -INFINITY;
    return v;
  };

  // pass A: running lower bound on the split's max logit
  if (kExact) {
    double v = -INFINITY;
    for (int lc = tid; lc < q.Cs; lc += kRowThreads) {
      const int c = q.col(s, lc);
      if (c >= 0) v = fmax(v, logit(g[lc], c) - err(c));
    }
    ml = fmax(ml, block_reduce<true>(v, sh));
  }

  // pass B: flags, exact logits of the flagged entries (a warp an entry), the new max.
  // A flagged entry's G is set to NaN (G is finite otherwise), which pass C reads as its
  // flag; an entry whose G is NaN already (NaN data, value checks off) gets e64 = NaN too,
  // so the NaN reaches the output.
  const int lane = tid & 31, wid = tid >> 5;
  double mx = -INFINITY;
  for (int base = 0; base < q.Cs; base += kRowThreads) {
    const int lc = base + tid;
    const int c = lc < q.Cs ? q.col(s, lc) : -1;
    bool f = false;
    if (c >= 0) {
      const double gv = logit(g[lc], c);
      f = kExact && flagged(gv, err(c), ml, lb, lbe);  // false for gv = -inf (also where ml = -inf)
      if (!f) mx = fmax(mx, gv);
      if (kExact && (f || isnan(gv))) {
        g[lc] = NAN;
        if (!f) e64[lc] = NAN;
      }
    }
    if (kExact) {
      const int nf = compact_flags(f, lc, flist, wcount);
      for (int i = wid; i < nf; i += kRowThreads / 32) {
        const int flc = flist[i];
        const T* r = ref + static_cast<long long>(q.col(s, flc)) * D;
        double d = 0.0;
        for (int j = lane; j < D; j += 32) {
          const double diff = to_double(x[j]) - to_double(r[j]);
          d += diff * diff;
        }
        const double ge = (xn - warp_sum(d)) * inv2s2 + (a.ref_logw ? a.ref_logw[q.col(s, flc)] : 0.0);
        if (lane == 0) e64[flc] = ge;
        mx = fmax(mx, ge);
      }
    }
  }
  mx = block_reduce<true>(mx, sh);  // its leading barrier publishes e64 and the NaN flags in G
  const double m_new = fmax(m_old, mx);

  // rescale the running state; m_new = -inf means the split has seen nothing yet (or only -inf
  // logits: the weights are taken against m_ref = 0 then, exp(-inf) = 0, not exp(-inf - -inf))
  const double scale = m_new == -INFINITY ? 1.0 : exp(m_old - m_new);
  const double m_ref = m_new == -INFINITY ? 0.0 : m_new;
  const double l64_old = a.l64[idx];
  if (kExact && l64_old > 0.0 && scale != 1.0)
    for (int j = tid; j < D; j += kRowThreads) acc64[j] *= scale;

  // pass C: weights; unflagged into G (fp32), flagged into acc64 (float64)
  double lsum = 0.0, l64sum = 0.0;
  for (int base = 0; base < q.Cs; base += kRowThreads) {
    const int lc = base + tid;
    const int c = lc < q.Cs ? q.col(s, lc) : -1;
    bool f = false;
    double p = 0.0;
    if (c >= 0) {
      const double gv = logit(g[lc], c);
      f = kExact && isnan(gv);  // flagged in pass B (a flag's label matches, so its NaN survives logit)
      if (!f) p = exp(gv - m_ref);
    }
    if (lc < q.Cs) g[lc] = static_cast<float>(p);
    lsum += p;
    if (kExact) {
      const int nf = compact_flags(f, lc, flist, wcount);
      for (int i = 0; i < nf; ++i) {
        const int flc = flist[i];
        const double w = exp(e64[flc] - m_ref);
        if (tid == 0) l64sum += w;
        const T* r = ref + static_cast<long long>(q.col(s, flc)) * D;
        for (int j = tid; j < D; j += kRowThreads) acc64[j] += w * to_double(r[j]);  // thread j owns acc64[j]
      }
    }
  }
  lsum = block_reduce<false>(lsum, sh);
  if (tid == 0) {
    a.m[idx] = m_new;
    a.ml[idx] = ml;
    a.l[idx] = a.l[idx] * scale + lsum + l64sum;
    a.l64[idx] = l64_old * scale + l64sum;
    a.scale[idx] = static_cast<float>(scale);
  }
}

template <int kMode, typename T>
__global__ void __launch_bounds__(kGemmThreads) pv_kernel(const float* __restrict__ P, const T* __restrict__ ref,
                                                          const float* __restrict__ scale,
                                                          const float* __restrict__ acc_in,
                                                          float* __restrict__ acc_out, ChunkGeom q) {
  __shared__ __align__(32) GemmSmem sm;
  __shared__ __align__(32) float out[kBM][kBN + 4];
  const int s = blockIdx.z, r0 = blockIdx.y * kBM, d0 = blockIdx.x * kBN;
  const int D = q.D;
  const float* prow = P + static_cast<long long>(s) * q.B * q.Cs;
  auto loadA = [&](int m, int k) -> float {
    const int row = r0 + m;
    return (row < q.B && k < q.Cs) ? prow[static_cast<long long>(row) * q.Cs + k] : 0.0f;
  };
  auto loadB = [&](int k, int n) -> float {
    const int c = q.col(s, k), d = d0 + n;
    return (c >= 0 && d < D) ? static_cast<float>(ref[static_cast<long long>(c) * D + d]) : 0.0f;
  };
  gemm_tile<kMode, false>(q.Cs, loadA, loadB, sm, out);
  for (int e = threadIdx.x; e < kBM * kBN; e += kGemmThreads) {
    const int m = e / kBN, n = e % kBN, row = r0 + m, d = d0 + n;
    if (row >= q.B || d >= D) continue;
    const long long o = (static_cast<long long>(s) * q.B + row) * D + d;
    acc_out[o] = acc_in[o] * scale[s * q.B + row] + out[m][n];
  }
}

template <typename TO>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(StfArgs a, int S, TO* __restrict__ t) {
  const int b = blockIdx.x, B = a.B, D = a.D;
  double w[kMaxSplits];
  double mmax = -INFINITY;
  for (int s = 0; s < S; ++s) mmax = fmax(mmax, a.m[s * B + b]);
  double ltot = 0.0;
  for (int s = 0; s < S; ++s) {
    const double m = a.m[s * B + b];
    w[s] = m == -INFINITY ? 0.0 : exp(m - mmax);  // an empty split weighs 0, never NaN
    ltot += w[s] * a.l[s * B + b];
  }
  const int d = blockIdx.y * kCombineThreads + threadIdx.x;
  if (d < D) {
    double num = 0.0;
    for (int s = 0; s < S; ++s) {
      const long long o = (static_cast<long long>(s) * B + b) * D + d;
      double part = a.acc_a[o];
      if (a.exact) part += a.acc64[o];
      num += w[s] * part;
    }
    // ltot = 0 only if every split is empty; a NaN (NaN data with value checks off) stays NaN
    t[static_cast<long long>(b) * D + d] = static_cast<TO>(ltot == 0.0 ? 0.0 : num / ltot);
  }
  if (blockIdx.y == 0 && threadIdx.x == 0)
    a.lse[b] = ltot == 0.0 ? -INFINITY : mmax + log(ltot) - a.xn[b] * a.inv2s2[b];
}

template <int kMode, typename T>
void launch_chunk(const StfArgs& a, const ChunkGeom& q, const float* acc_in, float* acc_out, cudaStream_t st) {
  const int S = a.plan.S;
  logits_kernel<kMode, T><<<dim3((q.Cs + kBN - 1) / kBN, (q.B + kBM - 1) / kBM, S), kGemmThreads, 0, st>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.ref), a.rn32, a.G, q);
  if (a.exact)
    row_kernel<true, T><<<dim3(q.B, S), kRowThreads, 0, st>>>(a, q);
  else
    row_kernel<false, T><<<dim3(q.B, S), kRowThreads, 0, st>>>(a, q);
  pv_kernel<kMode, T><<<dim3((q.D + kBN - 1) / kBN, (q.B + kBM - 1) / kBM, S), kGemmThreads, 0, st>>>(
      a.G, static_cast<const T*>(a.ref), a.scale, acc_in, acc_out, q);
}

template <typename T>
cudaError_t run_typed(StfArgs a, cudaStream_t st) {
  const int B = a.B, N = a.N, D = a.D, S = a.plan.S;
  sqnorm_kernel<T><<<B, 256, 0, st>>>(static_cast<const T*>(a.x), D, a.xn);
  sqnorm_kernel<T><<<N, 256, 0, st>>>(static_cast<const T*>(a.ref), D, a.rn);
  ref_consts_kernel<<<1, 1024, 0, st>>>(a.rn, N, a.rnorm, a.rn32, a.lever);
  row_consts_kernel<<<(B + 255) / 256, 256, 0, st>>>(a.sigma, a.xn, B, D, N, a.log_error_budget, a.lever,
                                                    a.xnorm, a.inv2s2, a.lb, a.lbe);
  init_state_kernel<<<(S * B + 255) / 256, 256, 0, st>>>(S * B, a.m, a.ml, a.l, a.l64);
  cudaMemsetAsync(a.acc_a, 0, sizeof(float) * S * static_cast<size_t>(B) * D, st);
  if (a.exact) cudaMemsetAsync(a.acc64, 0, sizeof(double) * S * static_cast<size_t>(B) * D, st);
  float* acc_in = a.acc_a;
  float* acc_out = a.acc_b;
  for (int j = 0; j < a.plan.n_chunks; ++j) {
    const ChunkGeom q{B, N, D, a.plan.Cs, a.plan.span, j * a.plan.Cs};
    switch (a.mode) {
      case kTf32x3: launch_chunk<kTf32x3, T>(a, q, acc_in, acc_out, st); break;
      case kTf32: launch_chunk<kTf32, T>(a, q, acc_in, acc_out, st); break;
      default: launch_chunk<kBf16, T>(a, q, acc_in, acc_out, st); break;
    }
    float* tmp = acc_in;
    acc_in = acc_out;
    acc_out = tmp;
  }
  a.acc_a = acc_in;  // the final accumulator
  const dim3 grid(B, (D + kCombineThreads - 1) / kCombineThreads);
  if (a.t_is_double)
    combine_kernel<double><<<grid, kCombineThreads, 0, st>>>(a, S, static_cast<double*>(a.t));
  else
    combine_kernel<float><<<grid, kCombineThreads, 0, st>>>(a, S, static_cast<float*>(a.t));
  return cudaGetLastError();
}

}  // namespace

StfPlan stf_plan(int B, int N, int D, long long chunk, bool exact, int device) {
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Splits over N so that pv_kernel has about two blocks per SM when B is small.
  const long long blocks = static_cast<long long>((B + kBM - 1) / kBM) * ((D + kBN - 1) / kBN);
  long long S = (2LL * sms + blocks - 1) / blocks;
  S = S < 1 ? 1 : S;
  const long long by_n = (N + 511) / 512;
  S = S > by_n ? by_n : S;
  S = S > kMaxSplits ? kMaxSplits : S;
  S = S < 1 ? 1 : S;
  StfPlan p;
  p.S = static_cast<int>(S);
  const int per = (N + p.S - 1) / p.S;
  p.span = (per + kAlign - 1) / kAlign * kAlign;
  long long cs = chunk > 0 ? chunk / p.S : p.span;
  cs = cs / kAlign * kAlign;
  if (cs < kAlign) cs = kAlign;
  if (cs > p.span) cs = p.span;
  (void)exact;
  p.Cs = static_cast<int>(cs);
  p.n_chunks = (p.span + p.Cs - 1) / p.Cs;
  return p;
}

cudaError_t stf_run(const StfArgs& a, cudaStream_t stream) {
  return a.is_double ? run_typed<double>(a, stream) : run_typed<float>(a, stream);
}

}  // namespace fastdiff_cuda
