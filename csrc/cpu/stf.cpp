// The Stable Target Field target, C++ CPU backend (`backend="cpu"`).
//
// The algorithm is the one of `stf_target_torch` in fastdiff/ops/stf.py, line
// for line (read that docstring first); this file only fuses its per-entry
// work into one pass per row and chunk:
//
//   per chunk of ref (C rows):
//     G = x_f32 @ r_f32^T                       (MKL sgemm, at::mm_out)
//     per row i (at::parallel_for):
//       a_ik  = 2 G_ik - ||r_k||^2              (fp32, as the torch backend)
//       l_ik  = a_ik / (2 s_i^2) - ||x_i||^2 / (2 s_i^2)     (float64)
//       e_ik  = GEMM_GAMMA(D) (||r_k||^2 + 2 ||x_i|| ||r_k||) / (2 s_i^2)
//       m_low_i = max(m_low_i, max_k (l_ik - e_ik))
//       flag  (rules A and B of flag_entries in fastdiff/ops/stf.py)
//             -> l_ik = -||x_i - r_k||^2 / (2 s_i^2) by direct difference, float64
//       online log-sum-exp (float64 m_i, s_i); flagged p_ik accumulated into a
//       float64 row accumulator, the others written to P (fp32)
//     acc = acc * scale + P @ r_f32              (ws_sparse_f32_avx2 where P is sparse,
//                                                 else ws_dense_f32_avx2; MKL sgemm
//                                                 without AVX2)
//   rows with many flags (DENSE_SHARE, moderate sigma) take float64-expansion
//   logits (error bound gemm_gamma(D, 2^-53)) instead of per-entry re-evaluation:
//   decided for the whole call by a 64-row probe of ref before the first GEMM
//   (such rows skip the fp32 GEMM), or per chunk after it; their weighted sum
//   stays in P where its fp32 error provably fits the budget (ws32_ok), else it
//   is a float64 GEMM. This part is the cpu backend's own (the torch backend's
//   dense rows pay the fp32 GEMM and a float64 weighted sum); the flag rule is
//   the same.
//   t_i = (acc64_i + acc_i) / s_i,  lse_i = m_i + log s_i
//
// With labels / ref_logw every logit gets b_ik = ref_logw_k, or -inf where
// ref_labels_k != labels_i, in float64 after the GEMM (and after each exact
// re-evaluation); the error bound is the distance part's, and a -inf entry is
// never flagged (l > reject fails). A row with no finite entry gets t = 0 and
// lse = -inf.
//
// No B x N x D tensor; working memory is the B x C tiles (fp32 and float64)
// plus one fp32 copy of a chunk of ref when ref is not fp32.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace fastdiff_ext {
namespace {

// Keep in sync with fastdiff/ops/stf.py: gemm_gamma(D) and ERROR_BUDGET.
inline double gemm_gamma(int64_t D) { return std::ldexp(1.0, -24) * (8.0 + 2.0 * std::sqrt((double)D)); }
constexpr double kErrorBudget = 1e-5;
// Keep in sync with fastdiff/ops/stf.py: DENSE_SHARE (rows with more flags take float64 GEMMs).
constexpr double kDenseShare = 1.0 / 4.0;
// Keep in sync with fastdiff/ops/stf.py: MAX_SQNORM (float32 max / 4: the fp32 GEMM's
// |2 x.r - ||r||^2| <= ||x||^2 + 2 ||r||^2 stays finite).
constexpr double kMaxSqNorm = 3.4028234663852886e38 / 4.0;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// ||x - r||^2 by direct difference in float64 (four partial sums: the loop
// vectorizes and does not wait on one add chain).
template <typename R>
inline double sqdist(const double* x, const R* r, int64_t D) {
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const double v0 = x[d] - static_cast<double>(r[d]), v1 = x[d + 1] - static_cast<double>(r[d + 1]);
    const double v2 = x[d + 2] - static_cast<double>(r[d + 2]), v3 = x[d + 3] - static_cast<double>(r[d + 3]);
    a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;
  }
  for (; d < D; ++d) {
    const double v = x[d] - static_cast<double>(r[d]);
    a0 += v * v;
  }
  return (a0 + a1) + (a2 + a3);
}

// ||r||^2 in float64, same scheme.
template <typename R>
inline double sumsq(const R* r, int64_t D) {
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const double v0 = static_cast<double>(r[d]), v1 = static_cast<double>(r[d + 1]);
    const double v2 = static_cast<double>(r[d + 2]), v3 = static_cast<double>(r[d + 3]);
    a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;
  }
  for (; d < D; ++d) {
    const double v = static_cast<double>(r[d]);
    a0 += v * v;
  }
  return (a0 + a1) + (a2 + a3);
}

// The norms pass reads all of ref once and is the largest cost beyond the two
// GEMMs; the build targets baseline x86-64 (SSE2), so the fp32 case gets an
// AVX2/FMA version chosen at run time (about 3x faster).
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// sum r[d]^2 (16 partial sums, d mod 16, added pairwise, then the lanes (l0 + l1) + (l2 + l3),
// then the last D mod 16 in order).
__attribute__((target("avx2,fma"))) double sumsq_f32_avx2(const float* r, int64_t D) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd(),
          a3 = _mm256_setzero_pd();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m256d v0 = _mm256_cvtps_pd(_mm_loadu_ps(r + d)), v1 = _mm256_cvtps_pd(_mm_loadu_ps(r + d + 4));
    const __m256d v2 = _mm256_cvtps_pd(_mm_loadu_ps(r + d + 8)), v3 = _mm256_cvtps_pd(_mm_loadu_ps(r + d + 12));
    a0 = _mm256_fmadd_pd(v0, v0, a0);
    a1 = _mm256_fmadd_pd(v1, v1, a1);
    a2 = _mm256_fmadd_pd(v2, v2, a2);
    a3 = _mm256_fmadd_pd(v3, v3, a3);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  double acc = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; d < D; ++d) acc += static_cast<double>(r[d]) * static_cast<double>(r[d]);
  return acc;
}
// FASTDIFF_CPU_NO_AVX2=1 (read once, at load) takes the baseline paths on any CPU, so that they
// are tested where AVX2 is present (tests/test_stf.py runs its cases so in a subprocess).
const bool kHaveAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                       !(std::getenv("FASTDIFF_CPU_NO_AVX2") &&
                         std::string(std::getenv("FASTDIFF_CPU_NO_AVX2")) == "1");
template <>
inline double sumsq<float>(const float* r, int64_t D) {
  if (kHaveAvx2) return sumsq_f32_avx2(r, D);
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const double v0 = r[d], v1 = r[d + 1], v2 = r[d + 2], v3 = r[d + 3];
    a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;
  }
  for (; d < D; ++d) a0 += static_cast<double>(r[d]) * static_cast<double>(r[d]);
  return (a0 + a1) + (a2 + a3);
}
// n >= 1 rows cut into ceil(n / most) tiles of heights as even as can be (n = 32, most = 6:
// 6 6 5 5 5 5, not 6 6 6 6 6 2): tile t holds rows first(t) .. first(t) + rows(t) - 1.
struct EvenTiles {
  int64_t n, count;
  EvenTiles(int64_t n_, int64_t most) : n(n_), count((n_ + most - 1) / most) {}
  int64_t first(int64_t t) const { return t * (n / count) + std::min(t, n % count); }
  int64_t rows(int64_t t) const { return n / count + (t < n % count ? 1 : 0); }
};

// The dense rows' float64 logits GEMM, G = XD R^T, with XD (nd, D) float64 and R (s, D) the
// float32 chunk of ref, widened to float64 (exactly) a block at a time: a float64 copy of the
// chunk costs ~0.4 of an fp32 GEMM, and MKL's dgemm on thin converted tiles runs ~25% slower
// than on the whole chunk. Per thread, groups of 8 rows of R; D in blocks of 512. A group's
// block is widened and transposed into a panel (d-major, 8 doubles per d, 32 KiB), the next
// block's rows requested meanwhile; register tiles of 5 or 6 rows of XD by the 8 columns run
// down the panel (12 accumulators, one broadcast of x per row and d). The float64 tiles
// this replaced (dot products: 4 rows of XD by 3 of R, lanes added per block) took ~1.25x
// its time. Summation per entry: sequential over a block's d, blocks added in order, like a
// blocked GEMM (within gemm_gamma(D, 2^-53)'s model).
constexpr int64_t kDotCols = 8, kDotBlock = 512, kDotRows = 6;

template <int IB>
__attribute__((target("avx2,fma"), noinline)) void dot64_tile(const double* X, int64_t D, const double* panel,
                                                               int64_t n, double* out, int64_t ldo) {
  __m256d acc[IB][2];
  for (int i = 0; i < IB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_pd();
  int64_t d = 0;
  do {  // n >= 1 (with `for`, GCC stores all of acc to memory on every d)
    const __m256d r0 = _mm256_load_pd(panel + d * kDotCols), r1 = _mm256_load_pd(panel + d * kDotCols + 4);
    for (int i = 0; i < IB; ++i) {
      const __m256d x = _mm256_broadcast_sd(X + i * D + d);
      acc[i][0] = _mm256_fmadd_pd(x, r0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_pd(x, r1, acc[i][1]);
    }
  } while (++d < n);
  for (int i = 0; i < IB; ++i) {
    _mm256_storeu_pd(out + i * ldo, _mm256_add_pd(_mm256_loadu_pd(out + i * ldo), acc[i][0]));
    _mm256_storeu_pd(out + i * ldo + 4, _mm256_add_pd(_mm256_loadu_pd(out + i * ldo + 4), acc[i][1]));
  }
}

// panel[d][j] = R[j][d] widened, d < n, j < 8 (rows j >= nr are 0); sq[j] += sum_d R[j][d]^2
// (4 lanes, added (l0 + l1) + (l2 + l3), then the last n mod 4 in order).
__attribute__((target("avx2,fma"))) void dot64_panel(const float* R, int64_t D, int64_t nr, int64_t n,
                                                     double* panel, double* sq) {
  static const float kZeros[kDotBlock] = {};
  const float* rows[kDotCols];
  for (int j = 0; j < kDotCols; ++j) rows[j] = j < nr ? R + j * D : kZeros;
  __m256d s[kDotCols];
  for (int j = 0; j < kDotCols; ++j) s[j] = _mm256_setzero_pd();
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    __m256d v[kDotCols];
    for (int j = 0; j < kDotCols; ++j) {
      v[j] = _mm256_cvtps_pd(_mm_loadu_ps(rows[j] + d));
      s[j] = _mm256_fmadd_pd(v[j], v[j], s[j]);
    }
    for (int h = 0; h < 2; ++h) {  // two 4 x 4 transposes: rows 4h..4h+3, columns d..d+3
      const __m256d t0 = _mm256_unpacklo_pd(v[4 * h], v[4 * h + 1]), t1 = _mm256_unpackhi_pd(v[4 * h], v[4 * h + 1]);
      const __m256d t2 = _mm256_unpacklo_pd(v[4 * h + 2], v[4 * h + 3]);
      const __m256d t3 = _mm256_unpackhi_pd(v[4 * h + 2], v[4 * h + 3]);
      _mm256_store_pd(panel + (d + 0) * kDotCols + 4 * h, _mm256_permute2f128_pd(t0, t2, 0x20));
      _mm256_store_pd(panel + (d + 1) * kDotCols + 4 * h, _mm256_permute2f128_pd(t1, t3, 0x20));
      _mm256_store_pd(panel + (d + 2) * kDotCols + 4 * h, _mm256_permute2f128_pd(t0, t2, 0x31));
      _mm256_store_pd(panel + (d + 3) * kDotCols + 4 * h, _mm256_permute2f128_pd(t1, t3, 0x31));
    }
  }
  for (int j = 0; j < kDotCols; ++j) {
    alignas(32) double l[4];
    _mm256_store_pd(l, s[j]);
    sq[j] += (l[0] + l[1]) + (l[2] + l[3]);
  }
  for (; d < n; ++d)
    for (int j = 0; j < kDotCols; ++j) {
      const double v = static_cast<double>(rows[j][d]);
      panel[d * kDotCols + j] = v;
      sq[j] += v * v;
    }
}

// Groups g0..g1-1 of dot64_f32_avx2 (one thread's share).
__attribute__((target("avx2,fma"))) void dot64_groups(const double* XD, int64_t nd, const float* R, int64_t s,
                                                      int64_t D, double* out, double* rn, int64_t g0, int64_t g1) {
  auto buf = std::make_unique_for_overwrite<double[]>(static_cast<size_t>(kDotBlock * kDotCols + 8));
  double* panel = reinterpret_cast<double*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t{63});
  const EvenTiles tiles(nd, kDotRows);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t k0 = g * kDotCols, nr = std::min(kDotCols, s - k0);
    for (int64_t j = 0; j < nd; ++j) std::fill(out + j * s + k0, out + j * s + k0 + nr, 0.0);
    double sq[kDotCols] = {};
    for (int64_t d0 = 0; d0 < D; d0 += kDotBlock) {
      const int64_t n = std::min(D - d0, kDotBlock);
      dot64_panel(R + k0 * D + d0, D, nr, n, panel, sq);
      // The next block of ref (this group's next columns, else the next group's first) is
      // requested now, to arrive while this one's tiles compute.
      {
        const bool same = d0 + kDotBlock < D;
        const int64_t pk0 = same ? k0 : k0 + kDotCols, pd = same ? d0 + kDotBlock : 0;
        const int64_t pnr = std::min(kDotCols, s - pk0), pn = std::min(D - pd, kDotBlock);
        for (int64_t pk = 0; pk < pnr && (same || g + 1 < g1); ++pk)
          for (int64_t e = 0; e < pn; e += 16) __builtin_prefetch(R + (pk0 + pk) * D + pd + e, 0, 3);
      }
      for (int64_t t = 0; t < tiles.count; ++t) {
        const int64_t i0 = tiles.first(t), ib = tiles.rows(t);
        // A group of fewer than 8 rows (the last) adds into `part`, then into out.
        alignas(32) double part[kDotRows * kDotCols];
        const bool whole = nr == kDotCols;
        if (!whole) std::fill(part, part + kDotRows * kDotCols, 0.0);
        double* o = whole ? out + i0 * s + k0 : part;
        const int64_t ldo = whole ? s : kDotCols;
        const double* X = XD + i0 * D + d0;
        switch (ib) {
          case 6: dot64_tile<6>(X, D, panel, n, o, ldo); break;
          case 5: dot64_tile<5>(X, D, panel, n, o, ldo); break;
          case 4: dot64_tile<4>(X, D, panel, n, o, ldo); break;
          case 3: dot64_tile<3>(X, D, panel, n, o, ldo); break;
          case 2: dot64_tile<2>(X, D, panel, n, o, ldo); break;
          default: dot64_tile<1>(X, D, panel, n, o, ldo); break;
        }
        if (!whole)
          for (int64_t i = 0; i < ib; ++i)
            for (int64_t j = 0; j < nr; ++j) out[(i0 + i) * s + k0 + j] += part[i * kDotCols + j];
      }
    }
    if (rn)
      for (int64_t j = 0; j < nr; ++j) rn[k0 + j] = sq[j];
  }
}

// out (nd, s), row-major, overwritten; rn (s) null, or set to ||R_k||^2 (float64, from the
// widened blocks: every element of R is widened exactly once).
void dot64_f32_avx2(const double* XD, int64_t nd, const float* R, int64_t s, int64_t D, double* out,
                    double* rn) {
  at::parallel_for(0, (s + kDotCols - 1) / kDotCols, 1,
                   [&](int64_t g0, int64_t g1) { dot64_groups(XD, nd, R, s, D, out, rn, g0, g1); });
}

// The weighted sum A (B, D) += P (B, c) @ R (c, D) in fp32, where P is sparse. Near one-hot
// weights (EDM's sigma, mostly) leave most of P zero, but MKL's sgemm costs the same: at B = 32
// it spends more time packing R (a copy of the chunk, from L3 or memory) than multiplying. This
// kernel reads R in place and skips, per tile of rows, the references whose weights are 0 in
// all of its rows; the rows are tiled in order of their nonzero count, so the dense rows share
// tiles. Where the tiles' nonzeros are many (sigma 5..50), ws_dense_f32_avx2 below is faster
// (this kernel reads R along its columns, 16 floats of a 12 KiB row at a time): the caller uses it.
// Per thread, panels of kWsPanel columns; k in blocks of kWsBlock (a panel's block stays in L2
// across the tiles); register tiles (ws16_tile) of 6 rows by 16 columns. Summation per entry:
// sequential over a block's nonzero k (from zero), blocks added in order, like a blocked GEMM's
// (the gemm_gamma(C) model of ws32_ok).
constexpr int64_t kWsBlock = 64, kWsRows = 6, kWsCols = 16, kWsPanel = 256;
// The kernel runs where the tiles' nonzeros are at most this share of (tiles x c) (measured at
// N = 1024, sigma 5..50, where every weight is nonzero: it costs ~2x ws_dense_f32_avx2 there).
constexpr double kWsMaxDensity = 0.25;

// The fp32 weighted sums' register tile, shared by the sparse and the dense kernel: for rows
// i < IB, A_i[d, d + 16) += sum over t < nk of P_i[k] R_k[0, 16) with k = ks[t] (the sparse
// kernel's list of live references) or k = t (kList false: the dense kernel's strip), R_k =
// R + k ldr. Summed from zero in registers (12 accumulators), then added to A. nk >= 1: the
// loop is do-while because with `for` GCC 12 stores all of acc to the stack on every step.
template <int IB, bool kList>
__attribute__((target("avx2,fma"), noinline)) void ws16_tile(const float* const* Pr, const int32_t* ks, int64_t nk,
                                                              const float* R, int64_t ldr, float* const* Ar,
                                                              int64_t d) {
  __m256 acc[IB][2];
  for (int i = 0; i < IB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  int64_t t = 0;
  do {
    const int64_t k = kList ? ks[t] : t;
    const __m256 r0 = _mm256_loadu_ps(R + k * ldr), r1 = _mm256_loadu_ps(R + k * ldr + 8);
    for (int i = 0; i < IB; ++i) {
      const __m256 p = _mm256_broadcast_ss(Pr[i] + k);
      acc[i][0] = _mm256_fmadd_ps(p, r0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(p, r1, acc[i][1]);
    }
  } while (++t < nk);
  for (int i = 0; i < IB; ++i) {
    _mm256_storeu_ps(Ar[i] + d, _mm256_add_ps(_mm256_loadu_ps(Ar[i] + d), acc[i][0]));
    _mm256_storeu_ps(Ar[i] + d + 8, _mm256_add_ps(_mm256_loadu_ps(Ar[i] + d + 8), acc[i][1]));
  }
}

// ws16_tile for a tile of ib rows, 1 <= ib <= kWsRows.
template <bool kList>
inline void ws16(int64_t ib, const float* const* Pr, const int32_t* ks, int64_t nk, const float* R, int64_t ldr,
                 float* const* Ar, int64_t d) {
  switch (ib) {
    case 6: ws16_tile<6, kList>(Pr, ks, nk, R, ldr, Ar, d); break;
    case 5: ws16_tile<5, kList>(Pr, ks, nk, R, ldr, Ar, d); break;
    case 4: ws16_tile<4, kList>(Pr, ks, nk, R, ldr, Ar, d); break;
    case 3: ws16_tile<3, kList>(Pr, ks, nk, R, ldr, Ar, d); break;
    case 2: ws16_tile<2, kList>(Pr, ks, nk, R, ldr, Ar, d); break;
    default: ws16_tile<1, kList>(Pr, ks, nk, R, ldr, Ar, d); break;
  }
}

// The same for columns d..d+w-1, w < kWsCols, any number of rows.
inline void ws_tail(int64_t ib, const float* const* Pr, const int32_t* ks, int64_t nk, const float* R, int64_t D,
                    float* const* Ar, int64_t d, int64_t w) {
  for (int64_t i = 0; i < ib; ++i)
    for (int64_t e = d; e < d + w; ++e) {
      float a = Ar[i][e];
      for (int64_t t = 0; t < nk; ++t) a += Pr[i][ks[t]] * R[ks[t] * D + e];
      Ar[i][e] = a;
    }
}

// A (B, D) += P (B, c) @ R (c, D), A zeroed first when `first`; false (nothing done) where P
// is too dense for it (kWsMaxDensity).
bool ws_sparse_f32_avx2(const float* P, int64_t B, int64_t c, const float* R, int64_t D, float* A, bool first) {
  // Rows in order of their nonzero count, tiled by kWsRows; per tile, the references with a
  // nonzero weight in any of its rows (ks, in order; cut[t * (nkb + 1) + b]: where k block b
  // starts in tile t's list).
  std::vector<int64_t> nnz(B), order(B);
  at::parallel_for(0, B, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) nnz[i] = c - std::count(P + i * c, P + (i + 1) * c, 0.0f);
  });
  for (int64_t i = 0; i < B; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t u, int64_t v) { return nnz[u] < nnz[v]; });
  const int64_t ntiles = (B + kWsRows - 1) / kWsRows, nkb = (c + kWsBlock - 1) / kWsBlock;
  std::vector<int32_t> ks(static_cast<size_t>(ntiles * c));
  std::vector<int64_t> cut(static_cast<size_t>(ntiles * (nkb + 1)));
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kWsRows, ib = std::min(B - i0, kWsRows);
      int32_t* list = ks.data() + t * c;
      int64_t n = 0;
      for (int64_t b = 0; b < nkb; ++b) {
        cut[t * (nkb + 1) + b] = n;
        for (int64_t k = b * kWsBlock; k < std::min(c, (b + 1) * kWsBlock); ++k) {
          bool any = false;
          for (int64_t i = 0; i < ib; ++i) any |= P[order[i0 + i] * c + k] != 0.0f;
          if (any) list[n++] = static_cast<int32_t>(k);
        }
      }
      cut[t * (nkb + 1) + nkb] = n;
    }
  });
  int64_t live = 0;
  for (int64_t t = 0; t < ntiles; ++t) live += cut[t * (nkb + 1) + nkb];
  if (static_cast<double>(live) > kWsMaxDensity * static_cast<double>(ntiles * c)) return false;

  const int64_t npanels = (D + kWsPanel - 1) / kWsPanel;
  at::parallel_for(0, npanels, 1, [&](int64_t q0, int64_t q1) {
    if (first)
      for (int64_t i = 0; i < B; ++i)
        std::fill(A + i * D + q0 * kWsPanel, A + i * D + std::min(D, q1 * kWsPanel), 0.0f);
    for (int64_t q = q0; q < q1; ++q)
      for (int64_t b = 0; b < nkb; ++b)
        for (int64_t t = 0; t < ntiles; ++t) {
          const int64_t i0 = t * kWsRows, ib = std::min(B - i0, kWsRows);
          const int64_t from = cut[t * (nkb + 1) + b], nk = cut[t * (nkb + 1) + b + 1] - from;
          if (nk == 0) continue;
          const int32_t* kl = ks.data() + t * c + from;
          const float* Pr[kWsRows];
          float* Ar[kWsRows];
          for (int64_t i = 0; i < ib; ++i) {
            Pr[i] = P + order[i0 + i] * c;
            Ar[i] = A + order[i0 + i] * D;
          }
          const int64_t dend = std::min(D, (q + 1) * kWsPanel);
          int64_t d = q * kWsPanel;
          for (; d + kWsCols <= dend; d += kWsCols) ws16<true>(ib, Pr, kl, nk, R + d, D, Ar, d);
          if (d < dend) ws_tail(ib, Pr, kl, nk, R, D, Ar, d, dend - d);
        }
  });
  return true;
}

// The same product where P is dense (sigma 5..50): A (B, D) += P (B, c) @ R (c, D). MKL's sgemm
// takes ~1.8x this kernel's time on it (B = 32, N = 1024, D = 3072, one thread, paired), and more
// than half of its time goes to packing R (its copy reads R down the columns, 16 floats of a
// row at a time, and D = 3072 makes the row stride 12 KiB, a multiple of 4 KiB: every row of a
// strip lands in one L1 set). Here a block of R (kWdRows rows by kWdPanel columns) is copied
// once into a buffer of 16-column strips, each row of a strip 64 contiguous bytes and the
// strips kWdRows rows plus one apart (no two strips alias); the copy reads R along its rows,
// and requests the next block's rows while it does. Register tiles (ws16_tile) of 5 or 6 rows
// of P by 16 columns run down a strip. Per thread, panels of columns. Summation per entry:
// sequential over a block's k (from zero), blocks added to A in order, as in a blocked GEMM
// (the gemm_gamma(C) model of ws32_ok).
constexpr int64_t kWdRows = 256, kWdPanel = 128, kWdStrip = kWdRows * kWsCols + kWsCols;

// Panels q0..q1-1 of ws_dense_f32_avx2 (one thread's share).
__attribute__((target("avx2,fma"))) void wd_panels(const float* P, int64_t B, int64_t c, const float* R, int64_t D,
                                                   float* A, bool first, int64_t q0, int64_t q1) {
  if (first)
    for (int64_t i = 0; i < B; ++i)
      std::fill(A + i * D + q0 * kWdPanel, A + i * D + std::min(D, q1 * kWdPanel), 0.0f);
  auto buf = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(kWdStrip * (kWdPanel / kWsCols) + 16));
  float* strips = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t{63});
  const EvenTiles tiles(B, kWsRows);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t d0 = q * kWdPanel, w = std::min(kWdPanel, D - d0), ns = (w + kWsCols - 1) / kWsCols;
    for (int64_t k0 = 0; k0 < c; k0 += kWdRows) {
      const int64_t nk = std::min(kWdRows, c - k0);
      // The next block of this thread: the panel's next rows, else the next panel's first.
      const bool same = k0 + kWdRows < c;
      const int64_t pk0 = same ? k0 + kWdRows : 0, pd0 = same ? d0 : d0 + kWdPanel;
      const int64_t pnk = same || q + 1 < q1 ? std::min(kWdRows, c - pk0) : 0;
      const int64_t pw = pnk > 0 ? std::min(kWdPanel, D - pd0) : 0;
      for (int64_t k = 0; k < nk; ++k) {
        const float* src = R + (k0 + k) * D + d0;
        for (int64_t e = 0; k < pnk && e < pw; e += 16) __builtin_prefetch(R + (pk0 + k) * D + pd0 + e, 0, 3);
        int64_t s = 0;
        for (; (s + 1) * kWsCols <= w; ++s) {
          _mm256_store_ps(strips + s * kWdStrip + k * kWsCols, _mm256_loadu_ps(src + s * kWsCols));
          _mm256_store_ps(strips + s * kWdStrip + k * kWsCols + 8, _mm256_loadu_ps(src + s * kWsCols + 8));
        }
        if (s < ns) {
          float* dst = strips + s * kWdStrip + k * kWsCols;
          for (int64_t e = 0; e < kWsCols; ++e) dst[e] = s * kWsCols + e < w ? src[s * kWsCols + e] : 0.0f;
        }
      }
      for (int64_t s = 0; s < ns; ++s) {
        const int64_t d = d0 + s * kWsCols, ws = std::min(kWsCols, w - s * kWsCols);
        for (int64_t t = 0; t < tiles.count; ++t) {
          const int64_t i0 = tiles.first(t), ib = tiles.rows(t);
          const float* Pr[kWsRows];
          float* Ar[kWsRows];
          // The last strip of a D that is not a multiple of 16 (its padding columns are 0) adds into
          // `part`, then into A.
          alignas(32) float part[kWsRows][kWsCols];
          const bool whole = ws == kWsCols;
          for (int64_t i = 0; i < ib; ++i) {
            Pr[i] = P + (i0 + i) * c + k0;
            Ar[i] = whole ? A + (i0 + i) * D : part[i];
            if (!whole) std::fill(part[i], part[i] + kWsCols, 0.0f);
          }
          const float* strip = strips + s * kWdStrip;
          const int64_t dt = whole ? d : 0;
          ws16<false>(ib, Pr, nullptr, nk, strip, kWsCols, Ar, dt);
          if (!whole)
            for (int64_t i = 0; i < ib; ++i)
              for (int64_t e = 0; e < ws; ++e) A[(i0 + i) * D + d + e] += part[i][e];
        }
      }
    }
  }
}

void ws_dense_f32_avx2(const float* P, int64_t B, int64_t c, const float* R, int64_t D, float* A, bool first) {
  at::parallel_for(0, (D + kWdPanel - 1) / kWdPanel, 1,
                   [&](int64_t q0, int64_t q1) { wd_panels(P, B, c, R, D, A, first, q0, q1); });
}
#else
const bool kHaveAvx2 = false;
void dot64_f32_avx2(const double*, int64_t, const float*, int64_t, int64_t, double*, double*) {}
bool ws_sparse_f32_avx2(const float*, int64_t, int64_t, const float*, int64_t, float*, bool) { return false; }
void ws_dense_f32_avx2(const float*, int64_t, int64_t, const float*, int64_t, float*, bool) {}
#endif

template <typename R>
inline void axpy(double* y, double a, const R* r, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * static_cast<double>(r[d]);
}

// The optional per-row / per-reference terms (labels, ref_labels: int64; ref_logw: float64).
struct Terms {
  const int64_t* labels = nullptr;      // (B,) or null
  const int64_t* ref_labels = nullptr;  // (N,) or null
  const double* ref_logw = nullptr;     // (N,) or null
  bool any() const { return labels != nullptr || ref_logw != nullptr; }
  // b_ik, with k the global reference row
  double bias(int64_t i, int64_t k) const {
    if (labels && labels[i] != ref_labels[k]) return -std::numeric_limits<double>::infinity();
    return ref_logw ? ref_logw[k] : 0.0;
  }
};

Terms check_terms(const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& ref_labels,
                  const std::optional<at::Tensor>& ref_logw, int64_t B, int64_t N, const at::Device& dev) {
  Terms tm;
  TORCH_CHECK(labels.has_value() == ref_labels.has_value(), "stf_target: labels and ref_labels go together");
  auto check = [&](const at::Tensor& v, const char* name, at::ScalarType dt, int64_t n) {
    TORCH_CHECK(v.dim() == 1 && v.size(0) == n && v.scalar_type() == dt && v.is_contiguous() &&
                    v.device() == dev,
                "stf_target: ", name, " must be a contiguous (", n, ",) ", dt, " tensor on x's device");
  };
  if (labels.has_value()) {
    check(*labels, "labels", at::kLong, B);
    check(*ref_labels, "ref_labels", at::kLong, N);
    tm.labels = labels->data_ptr<int64_t>();
    tm.ref_labels = ref_labels->data_ptr<int64_t>();
  }
  if (ref_logw.has_value()) {
    check(*ref_logw, "ref_logw", at::kDouble, N);
    tm.ref_logw = ref_logw->data_ptr<double>();
  }
  return tm;
}

// Raises ValueError naming `name` and the row if a (finite) row's squared norm is beyond kMaxSqNorm.
void check_sqnorms(const std::vector<double>& norms, const char* name) {
  for (int64_t k = 0; k < (int64_t)norms.size(); ++k)
    TORCH_CHECK_VALUE(norms[k] <= kMaxSqNorm, name, " row ", k, " has squared norm ", norms[k], ", more than ",
                      kMaxSqNorm, ": the float32 distance GEMMs would overflow. Scale the data down (the target ",
                      "scales with it: stf_target(c x, c sigma, c ref) = c stf_target(x, sigma, ref))");
}

void check_args(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref,
                const std::string& precision, int64_t chunk, const at::Tensor& t, const at::Tensor& lse) {
  TORCH_CHECK(precision == "highest" || precision == "tf32x3" || precision == "tf32" || precision == "bf16",
              "stf_target: unknown precision '", precision, "'");
  TORCH_CHECK(x.dim() == 2 && ref.dim() == 2 && x.size(1) == ref.size(1),
              "stf_target: x must be (B, D) and ref (N, D)");
  TORCH_CHECK(sigma.dim() == 1 && sigma.size(0) == x.size(0) && sigma.scalar_type() == at::kFloat,
              "stf_target: sigma must be (B,) float32");
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.is_contiguous(),
              "stf_target: t must be a contiguous (B, D) tensor of x's dtype");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == x.size(0) && lse.scalar_type() == at::kDouble &&
              lse.is_contiguous(), "stf_target: lse must be a contiguous (B,) float64 tensor");
  TORCH_CHECK(chunk >= 1, "stf_target: chunk must be positive");
  for (const at::Tensor* p : {&x, &sigma, &ref, &t, &lse})
    TORCH_CHECK(p->device().is_cpu(), "stf_target (cpu): all tensors must be on the CPU");
}

// Raises ValueError naming `name` if a row whose float64 norm is not finite
// holds a NaN or Inf.
void check_finite_rows(const at::Tensor& a, const std::vector<double>& norms, const char* name) {
  const int64_t D = a.size(1);
  for (int64_t k = 0; k < (int64_t)norms.size(); ++k) {
    if (std::isfinite(norms[k])) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "stf_check_finite", [&] {
      const scalar_t* row = a.data_ptr<scalar_t>() + k * D;
      for (int64_t d = 0; d < D; ++d)
        TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(row[d])), name, " contains NaN or Inf (row ", k, ")");
    });
  }
}

// log(expm1(e)), floored like the torch backend's clamp_min(1e-300), and
// finite for large e (there expm1 overflows but log(expm1(e)) = e + log1p(-exp(-e))).
inline double log_expm1(double e) {
  if (e > 40.0) return e + std::log1p(-std::exp(-e));
  return std::log(std::max(std::expm1(e), 1e-300));
}

// Rules A and B of flag_entries (fastdiff/ops/stf.py) for one entry: logit lk, error bound ek,
// the row's lower bound on its max mlow, log_budget = log(budget / lever) - log N (per row).
inline bool flag_rule(double lk, double ek, double mlow, double log_budget, double log_n) {
  const double lem1 = log_expm1(ek);
  return lem1 > log_budget + log_n && lk + ek - mlow + lem1 > log_budget;  // A and B both fail
}

// Rows of ref per float64 sub-chunk of the dense rows' GEMMs: a converted tile of ~2 MiB
// stays in cache between its conversion and its GEMM (and bounds the memory).
inline int64_t dense_tile_rows(int64_t D, int64_t c) {
  return std::min<int64_t>(c, std::max<int64_t>(16, (int64_t{1} << 21) / (8 * D)));
}

// How the rows are split. A row is "dense" in a chunk when its logits come from the float64
// expansion (error bound gamma64, ~2^-29 of the fp32 one): decided up front for the whole call
// by a probe (below), or in the chunk after the fp32 GEMM flagged more than DENSE_SHARE of it.
// Up-front dense rows skip the fp32 GEMM altogether. A dense row's weighted sum is an fp32
// GEMM with the other rows' (one P @ ref) wherever its error provably fits the budget at the
// row's sigma (ws32_ok), else a float64 GEMM.
//
// Exact re-evaluation reads ref rows from the original data when ref is
// float64, else from the fp32 chunk (exact for fp32/bf16/fp16 data).
void stf_target_impl(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref, int64_t chunk,
                     const Terms& tm, at::Tensor& t, at::Tensor& lse) {
  const int64_t B = x.size(0), D = x.size(1), N = ref.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  const auto f64 = x.options().dtype(at::kDouble);
  const bool ref_is_f32 = ref.scalar_type() == at::kFloat;
  const bool ref_is_f64 = ref.scalar_type() == at::kDouble;
  const double log_n = std::log((double)N), sqrt_d = std::sqrt((double)D);

  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const float* SIG = sigma.data_ptr<float>();

  // x in float64 (for the exact re-evaluation and the float64 GEMMs) with ||x_i||^2, then
  // ||r_k||^2 in float64 from ref as given (the norms pass), then the per-row constants.
  std::vector<double> rn(N), rnorm(N), xnsq(B);
  std::vector<float> rnf(N);
  // Uninitialized buffers (make_unique_for_overwrite): every element is written before it is read.
  const bool x_is_f64 = x.scalar_type() == at::kDouble;
  auto x64buf = std::make_unique_for_overwrite<double[]>(x_is_f64 ? 0 : (size_t)(B * D));
  const double* X64 = x_is_f64 ? x.data_ptr<double>() : x64buf.get();
  double rnorm_max = 0.0, lever = 0.0, rn_max = 0.0;
  std::vector<double> inv2s2(B), offset(B), xnorm(B), log_budget(B);
  std::vector<char> ws32_ok(B, 0);
  const double gamma = gemm_gamma(D);
  const double gamma64 = std::ldexp(1.0, -53) * (8.0 + 2.0 * sqrt_d);  // gemm_gamma(D, 2^-53)
  const int64_t C = std::min(chunk, N);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stf_target_xnorm", [&] {
    const scalar_t* XS = x.data_ptr<scalar_t>();
    at::parallel_for(0, B, 4, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        if (!x_is_f64)
          for (int64_t d = 0; d < D; ++d) x64buf[i * D + d] = static_cast<double>(XS[i * D + d]);
        xnsq[i] = sumsq(X64 + i * D, D);
      }
    });
  });
  for (int64_t i = 0; i < B; ++i) {
    const double s = static_cast<double>(SIG[i]);
    inv2s2[i] = 0.5 / (s * s);
    offset[i] = xnsq[i] * inv2s2[i];
    xnorm[i] = std::sqrt(xnsq[i]);
  }
  auto set_rnorm = [&](int64_t k, double acc) {
    rn[k] = acc;
    rnorm[k] = std::sqrt(acc);
    rnf[k] = static_cast<float>(acc);
  };
  auto ref_norms_pass = [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "stf_target_rnorm", [&] {
      const scalar_t* R = ref.data_ptr<scalar_t>();
      at::parallel_for(0, N, 16, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) set_rnorm(k, sumsq(R + k * D, D));
      });
    });
  };
  // After every ||r_k||^2 is known: the data checks and the constants that need max ||r||.
  auto finish_norms = [&] {
    // NaN/Inf in the data shows in its float64 norms; the Python side leaves
    // this check to the kernel (fastdiff/ops/stf.py, _CHECKS_DATA). A norm can
    // also overflow for finite float64 data beyond 1e154: check the elements.
    check_finite_rows(ref, rn, "ref");
    check_sqnorms(rn, "ref");
    for (int64_t k = 0; k < N; ++k) rnorm_max = std::max(rnorm_max, rnorm[k]);
    lever = std::max(2.0 * rnorm_max, 1e-30);  // ||r_k - t_i|| <= 2 max ||r||
    rn_max = rnorm_max * rnorm_max;
    // The fp32 weighted sum acc_i = sum_k p_ik r_k (p_ik <= 1, rounded to fp32), one GEMM per
    // chunk, rescaled in fp32 between chunks: by the GEMM bound's model, componentwise,
    // |err_d| <= (gemm_gamma(C) + (3 chunks + 2) u) sum_k p_ik |r_kd|, so ||err|| / s_i <=
    // that factor times max ||r||. ws32_ok: within ERROR_BUDGET sigma_i sqrt(D) (with the
    // logits' ~4 ERROR_BUDGET, inside the 1e-4 contract), so a dense row may keep it.
    const double u = std::ldexp(1.0, -24);
    const double ws_factor = gemm_gamma(C) + (3.0 * (double)((N + C - 1) / C) + 2.0) * u;
    for (int64_t i = 0; i < B; ++i) {
      const double s = static_cast<double>(SIG[i]);
      log_budget[i] = std::log(kErrorBudget) + std::log(s * sqrt_d) - std::log(lever) - log_n;
      ws32_ok[i] = ws_factor * rnorm_max <= kErrorBudget * s * sqrt_d;
    }
    check_finite_rows(x, xnsq, "x");
    check_sqnorms(xnsq, "x");
  };

  // The probe: fp32 GEMM logits against up to kProbe evenly spaced rows of ref, flagged by
  // the rule with the probe's own norms and lower bound on the max. A row whose probe has
  // more than DENSE_SHARE flagged (moderate sigma: weights spread, fp32 bound above budget)
  // is dense for the whole call. Only a prediction: a wrong one costs time, not accuracy
  // (every row's logits carry their bound and are flagged as usual).
  constexpr int64_t kProbe = 64;
  std::vector<char> up_dense(B, 0);
  {
    const int64_t np = std::min(N, kProbe);
    at::Tensor probe = at::empty({np, D}, f32);
    float* PR = probe.data_ptr<float>();
    std::vector<int64_t> pk(np);
    std::vector<double> pn(np), pnorm(np);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "stf_target_probe", [&] {
      const scalar_t* R = ref.data_ptr<scalar_t>();
      for (int64_t p = 0; p < np; ++p) {
        pk[p] = p * N / np;
        for (int64_t d = 0; d < D; ++d) PR[p * D + d] = static_cast<float>(R[pk[p] * D + d]);
        pn[p] = sumsq(PR + p * D, D);
        pnorm[p] = std::sqrt(pn[p]);
      }
    });
    const double p_lever = std::max(2.0 * *std::max_element(pnorm.begin(), pnorm.end()), 1e-30);
    const at::Tensor GP = at::mm(xf, probe.t());
    const float* G = GP.data_ptr<float>();
    const int64_t need = static_cast<int64_t>(kDenseShare * static_cast<double>(np));
    at::parallel_for(0, B, 4, [&](int64_t i0, int64_t i1) {
      std::vector<double> l(np), e(np);
      for (int64_t i = i0; i < i1; ++i) {
        const double w = inv2s2[i], two_xn = 2.0 * xnorm[i];
        double low = kNegInf;
        for (int64_t p = 0; p < np; ++p) {
          l[p] = static_cast<double>(2.0f * G[i * np + p] - static_cast<float>(pn[p])) * w - offset[i] +
                 (tm.any() ? tm.bias(i, pk[p]) : 0.0);
          e[p] = gamma * (pn[p] + two_xn * pnorm[p]) * w;
          low = std::max(low, l[p] - e[p]);
        }
        const double lb = std::log(kErrorBudget) + std::log(static_cast<double>(SIG[i]) * sqrt_d) -
                          std::log(p_lever) - log_n;
        int64_t count = 0;
        for (int64_t p = 0; p < np; ++p)
          if (l[p] != kNegInf && flag_rule(l[p], e[p], low, lb, log_n)) ++count;
        up_dense[i] = count > need && count > 1;
      }
    });
  }
  // The fp32 GEMM streams (and MKL packs) all of ref whatever its rows (on this CPU 6 of 32
  // rows cost ~2/3 of all 32), and it needs a norms pass of its own; the float64 kernel costs
  // ~1.45x an fp32 GEMM row for row. Where at most half the rows would remain, they are dense
  // too (sigma 5..50 at N = 8192: 22 of 32 rows dense, paired x floor 1.69 -> 1.15).
  {
    const int64_t nu = std::count(up_dense.begin(), up_dense.end(), 1);
    if (nu > 0 && 2 * (B - nu) <= B) std::fill(up_dense.begin(), up_dense.end(), 1);
  }
  std::vector<int64_t> frows, urows;                 // fp32-GEMM rows, up-front dense rows
  std::vector<int64_t> fpos(B, -1);                  // row i's row in the fp32 GEMM, or -1
  for (int64_t i = 0; i < B; ++i) {
    if (up_dense[i]) {
      urows.push_back(i);
    } else {
      fpos[i] = static_cast<int64_t>(frows.size());
      frows.push_back(i);
    }
  }
  const int64_t nf = static_cast<int64_t>(frows.size());
  at::Tensor xfr = xf;                               // the fp32 GEMM's rows of x
  if (nf < B && nf > 0) {
    xfr = at::empty({nf, D}, f32);
    const float* XF = xf.data_ptr<float>();
    float* XR = xfr.data_ptr<float>();
    for (int64_t j = 0; j < nf; ++j) std::copy(XF + frows[j] * D, XF + (frows[j] + 1) * D, XR + j * D);
  }

  // Running state.
  std::vector<double> m(B, kNegInf), m_low(B, kNegInf), ssum(B, 0.0);
  at::Tensor acc = at::empty({B, D}, f32);  // written by the first chunk's mm
  // Row i of acc64 is zeroed when its first flagged entry arrives; any64[i] says whether it is live.
  auto acc64 = std::make_unique_for_overwrite<double[]>((size_t)(B * D));
  std::vector<char> any64(B, 0);

  // Per-chunk buffers, allocated once and viewed as contiguous (B, c) / (c, D).
  at::Tensor G_buf = at::empty({std::max<int64_t>(nf, 1) * C}, f32);
  at::Tensor P_buf = at::empty({B * C}, f32);
  at::Tensor rc_buf = ref_is_f32 ? at::Tensor() : at::empty({C * D}, f32);
  const int64_t S = dense_tile_rows(D, C);
  at::Tensor r64_buf;  // S rows of ref in float64, allocated on first use
  at::Tensor tile_buf, g64_buf;
  std::vector<double> L((size_t)(B * C));
  std::vector<char> dense(B, 0);           // row i's logits come from the float64 expansion in this chunk
  std::vector<int64_t> p64_pos(B, -1);     // row i's row in P64 (float64 weighted sum), or -1
  float* ACC = acc.data_ptr<float>();
  // With one chunk, the norms pass follows the first GEMM, which has just streamed ref
  // through the cache; with several, the bounds need max ||r|| before the first chunk.
  const bool norms_in_first_chunk = C >= N;
  if (!norms_in_first_chunk) {
    ref_norms_pass();
    finish_norms();
  }

  for (int64_t k0 = 0; k0 < N; k0 += C) {
    const int64_t c = std::min(C, N - k0);
    const at::Tensor rc = ref.narrow(0, k0, c);
    at::Tensor rcf;
    if (ref_is_f32) {
      rcf = rc;
    } else {
      rcf = rc_buf.narrow(0, 0, c * D).view({c, D});
      rcf.copy_(rc);
    }
    at::Tensor P = P_buf.narrow(0, 0, B * c).view({B, c});
    const float* GP = nullptr;
    if (nf > 0) {
      at::Tensor G = G_buf.narrow(0, 0, nf * c).view({nf, c});
      at::mm_out(G, xfr, rcf.t());
      GP = G.data_ptr<float>();
    }
    float* PP = P.data_ptr<float>();
    const float* RCF = rcf.data_ptr<float>();
    const double* RC64 = ref_is_f64 ? ref.data_ptr<double>() + k0 * D : nullptr;
    const double* rn_c = rn.data() + k0;
    const double* rnorm_c = rnorm.data() + k0;
    const float* rnf_c = rnf.data() + k0;

    // The chunk's ref rows s0..s0+s-1 in float64: a view of ref, or converted into r64_buf.
    auto ref64_tile = [&](int64_t s0, int64_t s) -> at::Tensor {
      if (ref_is_f64) return rc.narrow(0, s0, s);
      if (!r64_buf.defined()) r64_buf = at::empty({S * D}, f64);
      double* R64 = r64_buf.data_ptr<double>();
      at::parallel_for(0, s, 4, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const float* src = RCF + (s0 + j) * D;
          double* dst = R64 + j * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<double>(src[d]);
        }
      });
      return r64_buf.narrow(0, 0, s * D).view({s, D});
    };
    // Float64-expansion logits of `rows` (and their lower bound on the max): the AVX2 kernel
    // on the fp32 chunk, else MKL's dgemm on ref (float64 data) or on converted tiles of S rows.
    // with_norms (the AVX2 kernel only): the norms pass too, fused into its widening of ref.
    auto dense_logits = [&](const std::vector<int64_t>& rows, bool with_norms) {
      const int64_t nd = static_cast<int64_t>(rows.size());
      if (nd == 0) return;
      // The rows of x in float64: X64 itself for the AVX2 kernel when they are all the rows (rows
      // are in increasing order), else a copy (a tensor, for the MKL paths).
      const bool avx2 = kHaveAvx2 && !ref_is_f64;
      at::Tensor xd;
      const double* XD = X64;
      if (!avx2 || nd < B) {
        xd = at::empty({nd, D}, f64);
        double* xdp = xd.data_ptr<double>();
        for (int64_t j = 0; j < nd; ++j) std::copy(X64 + rows[j] * D, X64 + (rows[j] + 1) * D, xdp + j * D);
        XD = xdp;
      }
      if (!g64_buf.defined() || g64_buf.numel() < nd * c) g64_buf = at::empty({B * C}, f64);
      at::Tensor G64 = g64_buf.narrow(0, 0, nd * c).view({nd, c});
      if (avx2) {
        std::vector<double> rn_k(with_norms ? c : 0);
        dot64_f32_avx2(XD, nd, RCF, c, D, G64.data_ptr<double>(), with_norms ? rn_k.data() : nullptr);
        for (int64_t k = 0; k < (with_norms ? c : 0); ++k) set_rnorm(k0 + k, rn_k[k]);
      } else if (ref_is_f64) {
        at::mm_out(G64, xd, rc.t());
      } else {
        for (int64_t s0 = 0; s0 < c; s0 += S) {
          const int64_t s = std::min(S, c - s0);
          at::Tensor T = tile_buf.defined() ? tile_buf : (tile_buf = at::empty({B * S}, f64));
          at::Tensor Ts = T.narrow(0, 0, nd * s).view({nd, s});
          at::mm_out(Ts, xd, ref64_tile(s0, s).t());
          G64.narrow(1, s0, s).copy_(Ts);
        }
      }
      const double* g64 = G64.data_ptr<double>();
      at::parallel_for(0, nd, 1, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t i = rows[j];
          double* l = L.data() + i * c;
          const double w = inv2s2[i], off = offset[i], two_xn = 2.0 * xnorm[i];
          double low = kNegInf;
          for (int64_t k = 0; k < c; ++k) {
            const double lk = (2.0 * g64[j * c + k] - rn_c[k]) * w - off + (tm.any() ? tm.bias(i, k0 + k) : 0.0);
            l[k] = lk;
            low = std::max(low, lk - gamma64 * (rn_c[k] + two_xn * rnorm_c[k]) * w);
          }
          m_low[i] = std::max(m_low[i], low);
          dense[i] = 1;
        }
      });
    };

    std::fill(dense.begin(), dense.end(), 0);
    // Every row dense: the float64 kernel widens all of the (single) chunk, and its norms come with it.
    const bool norms_from_kernel = k0 == 0 && norms_in_first_chunk && nf == 0 && kHaveAvx2 && !ref_is_f64;
    if (norms_from_kernel) {
      dense_logits(urows, true);
      finish_norms();
    } else if (k0 == 0 && norms_in_first_chunk) {
      ref_norms_pass();
      finish_norms();
    }

    // Rule A (fastdiff/ops/stf.py, flag_entries): an error bound with
    // log(expm1(e)) <= budget_a is negligible at any weight; if the row's
    // largest e passes it, no entry of the row is flagged. Otherwise the slack
    // grows with e_ik, so the row's largest e gives a cheap reject threshold
    // before the exact test of rule B.
    auto reject_threshold = [&](int64_t i, double g, double mlow) {
      const double e_max = g * (rn_max + 2.0 * xnorm[i] * rnorm_max) * inv2s2[i];
      const double lem1_max = log_expm1(e_max);
      return lem1_max <= log_budget[i] + log_n ? std::numeric_limits<double>::infinity()
                                               : log_budget[i] + mlow - e_max - lem1_max;
    };
    auto flagged_entry = [&](int64_t i, int64_t k, double g, double lk, double mlow) {
      return flag_rule(lk, g * (rn_c[k] + 2.0 * xnorm[i] * rnorm_c[k]) * inv2s2[i], mlow, log_budget[i], log_n);
    };

    // Stage A (the fp32-GEMM rows): GEMM logits, the chunk's lower bound on the max, and how
    // many entries the fp32 bound flags; rows with many (DENSE_SHARE in stf.py) are dense in
    // this chunk: float64 GEMMs instead of one direct difference per entry.
    const int64_t dense_min = std::max<int64_t>(1, static_cast<int64_t>(kDenseShare * static_cast<double>(c)));
    // The GEMM logits of row i, b_ik added (kBias), and their lower bound on the max.
    auto gemm_logits = [&](int64_t i, auto has_bias) {
      constexpr bool kBias = decltype(has_bias)::value;
      const float* g = GP + fpos[i] * c;
      double* l = L.data() + i * c;
      const double w = inv2s2[i], off = offset[i], two_xn = 2.0 * xnorm[i];
      double low = kNegInf;
      for (int64_t k = 0; k < c; ++k) {
        const float a = 2.0f * g[k] - rnf_c[k];
        double lk = static_cast<double>(a) * w - off;
        if constexpr (kBias) lk += tm.bias(i, k0 + k);
        const double ek = gamma * (rn_c[k] + two_xn * rnorm_c[k]) * w;
        l[k] = lk;
        low = std::max(low, lk - ek);
      }
      return low;
    };
    std::vector<char> many(B, 0);
    at::parallel_for(0, nf, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t i = frows[j];
        double* l = L.data() + i * c;
        const double low = tm.any() ? gemm_logits(i, std::true_type{}) : gemm_logits(i, std::false_type{});
        const double mlow = std::max(m_low[i], low);
        m_low[i] = mlow;
        const double reject = reject_threshold(i, gamma, mlow);
        int64_t count = 0;
        if (reject != std::numeric_limits<double>::infinity())
          for (int64_t k = 0; k < c; ++k)
            if (l[k] > reject && flagged_entry(i, k, gamma, l[k], mlow)) ++count;
        many[i] = count > dense_min;
      }
    });
    std::vector<int64_t> drows;  // the chunk's dense rows still without float64 logits
    for (int64_t i = 0; i < B; ++i)
      if (many[i] || (up_dense[i] && !norms_from_kernel)) drows.push_back(i);
    dense_logits(drows, false);

    // Dense rows whose fp32 weighted sum is not provably within budget: a float64 GEMM.
    std::vector<int64_t> rows64;
    for (int64_t i = 0; i < B; ++i) {
      p64_pos[i] = -1;
      if (dense[i] && !ws32_ok[i]) {
        p64_pos[i] = static_cast<int64_t>(rows64.size());
        rows64.push_back(i);
      }
    }
    const int64_t n64 = static_cast<int64_t>(rows64.size());
    at::Tensor P64 = n64 > 0 ? at::empty({n64, c}, f64) : at::Tensor();
    double* P64P = n64 > 0 ? P64.data_ptr<double>() : nullptr;

    // Stage B: exact re-evaluation of the entries still flagged, online log-sum-exp.
    at::parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
      std::vector<int64_t> flagged;
      for (int64_t i = i0; i < i1; ++i) {
        double* l = L.data() + i * c;
        float* p = PP + i * c;
        const double w = inv2s2[i];
        const double g = dense[i] ? gamma64 : gamma;
        const double mlow = m_low[i];
        const double reject = reject_threshold(i, g, mlow);
        flagged.clear();
        double mx = kNegInf;
        for (int64_t k = 0; k < c; ++k) {
          double lk = l[k];
          if (lk > reject && flagged_entry(i, k, g, lk, mlow)) {
            lk = RC64 ? -sqdist(X64 + i * D, RC64 + k * D, D) * w
                      : -sqdist(X64 + i * D, RCF + k * D, D) * w;
            if (tm.any()) lk += tm.bias(i, k0 + k);  // finite: a -inf entry is never flagged
            l[k] = lk;
            flagged.push_back(k);
          }
          mx = std::max(mx, lk);
        }

        const double m_new = std::max(m[i], mx);
        double* p64 = p64_pos[i] >= 0 ? P64P + p64_pos[i] * c : nullptr;
        if (m_new == kNegInf) {  // no finite logit yet (labels / ref_logw): every weight is 0
          std::fill(p, p + c, 0.0f);
          if (p64) std::fill(p64, p64 + c, 0.0);
          continue;  // m, ssum, acc64 stay as they are; acc's row is 0 (all its P rows were)
        }
        const double scale = m[i] == kNegInf ? 0.0 : std::exp(m[i] - m_new);
        double srow = 0.0;
        for (int64_t k = 0; k < c; ++k) {
          const double z = l[k] - m_new;
          // exp underflows to 0 below about -745: skip it.
          const double pk = z < -746.0 ? 0.0 : std::exp(z);
          srow += pk;
          if (p64) {
            p64[k] = pk;   // its weighted sum is a float64 GEMM below
            p[k] = 0.0f;
          } else {
            p[k] = static_cast<float>(pk);
          }
        }
        ssum[i] = ssum[i] * scale + srow;
        double* a64 = acc64.get() + i * D;
        if (any64[i] && scale != 1.0)
          for (int64_t d = 0; d < D; ++d) a64[d] *= scale;
        for (int64_t k : flagged) {
          const double pk = std::exp(l[k] - m_new);
          if (pk != 0.0) {
            if (!any64[i]) std::fill(a64, a64 + D, 0.0);
            if (RC64) axpy(a64, pk, RC64 + k * D, D);
            else axpy(a64, pk, RCF + k * D, D);
            any64[i] = 1;
          }
          p[k] = 0.0f;
          if (p64) p64[k] = 0.0;
        }
        float* ai = ACC + i * D;
        if (k0 > 0 && scale != 1.0) {
          const float sf = static_cast<float>(scale);
          for (int64_t d = 0; d < D; ++d) ai[d] *= sf;
        }
        m[i] = m_new;
      }
    });
    if (n64 > 0) {
      at::Tensor A64 = at::zeros({n64, D}, f64);
      for (int64_t s0 = 0; s0 < c; s0 += S) {
        const int64_t s = std::min(S, c - s0);
        A64.addmm_(P64.narrow(1, s0, s), ref64_tile(s0, s));
      }
      const double* AP = A64.data_ptr<double>();
      at::parallel_for(0, n64, 1, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t i = rows64[j];
          double* a64 = acc64.get() + i * D;
          if (!any64[i]) {
            std::fill(a64, a64 + D, 0.0);
            any64[i] = 1;
          }
          for (int64_t d = 0; d < D; ++d) a64[d] += AP[j * D + d];
        }
      });
    }
    if (kHaveAvx2) {
      if (!ws_sparse_f32_avx2(PP, B, c, RCF, D, ACC, k0 == 0)) ws_dense_f32_avx2(PP, B, c, RCF, D, ACC, k0 == 0);
    } else if (k0 == 0)
      at::mm_out(acc, P, rcf);
    else
      acc.addmm_(P, rcf);
  }

  double* LSE = lse.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "stf_target_out", [&] {
    scalar_t* T = t.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* ti = T + i * D;
        if (ssum[i] == 0.0) {  // no reference row serves the row (labels / ref_logw)
          std::fill(ti, ti + D, static_cast<scalar_t>(0));
          LSE[i] = kNegInf;
          continue;
        }
        const double inv = 1.0 / ssum[i];
        const double* a64 = acc64.get() + i * D;
        const float* ai = ACC + i * D;
        if (any64[i])
          for (int64_t d = 0; d < D; ++d)
            ti[d] = static_cast<scalar_t>((a64[d] + static_cast<double>(ai[d])) * inv);
        else
          for (int64_t d = 0; d < D; ++d) ti[d] = static_cast<scalar_t>(static_cast<double>(ai[d]) * inv);
        LSE[i] = m[i] + std::log(ssum[i]);
      }
    });
  });
}

void stf_target_cpu(const at::Tensor& x_, const at::Tensor& sigma_, const at::Tensor& ref_,
                    c10::string_view precision, int64_t chunk, at::Tensor t, at::Tensor lse,
                    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& ref_labels,
                    const std::optional<at::Tensor>& ref_logw) {
  check_args(x_, sigma_, ref_, std::string(precision), chunk, t, lse);
  const Terms tm = check_terms(labels, ref_labels, ref_logw, x_.size(0), ref_.size(0), x_.device());
  if (x_.size(0) == 0) return;
  TORCH_CHECK(ref_.size(0) > 0, "stf_target: ref is empty");
  const at::Tensor x = x_.contiguous(), sigma = sigma_.contiguous(), ref = ref_.contiguous();
  // Called inside a bf16 autocast region (a mixed-precision train step), at::mm would return
  // bf16 products: the kernel's GEMMs are its own precision decisions, so autocast stays off.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // "highest" is the only mode on CPU: the faster modes are GPU matrix-unit modes.
  stf_target_impl(x, sigma, ref, chunk, tm, t, lse);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("stf_target(Tensor x, Tensor sigma, Tensor ref, str precision, int chunk, "
        "Tensor(a!) t, Tensor(b!) lse, Tensor? labels=None, Tensor? ref_labels=None, "
        "Tensor? ref_logw=None) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) {
  m.impl("stf_target", &stf_target_cpu);
}

}  // namespace fastdiff_ext
