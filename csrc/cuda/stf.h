// Interface between csrc/cuda/stf.cu (raw CUDA kernels, no torch headers) and
// csrc/cuda/stf_launch.cpp (torch registration, workspace allocation).
#pragma once
#include <cuda_runtime.h>

namespace fastdiff_cuda {

// Operand precision of the two matrix products (see kernels/stf.py for the modes).
enum StfMode : int { kTf32x3 = 0, kTf32 = 1, kBf16 = 2 };

// How N is cut: S splits of `span` reference rows, walked in chunks of Cs rows.
struct StfPlan {
  int S, span, Cs, n_chunks;
};

// chunk: reference rows per chunk over all splits (fastdiff.ops.stf.chunk_rows).
StfPlan stf_plan(int B, int N, int D, long long chunk, bool exact, int device);

struct StfArgs {
  const void* x;       // (B, D), float or double (is_double)
  const void* ref;     // (N, D), same dtype as x
  const float* sigma;  // (B,)
  bool is_double;
  int B, N, D;
  StfPlan plan;
  int mode;            // StfMode
  bool exact;          // precision "highest": float64 re-evaluation of flagged entries
  double gamma;        // bound factor on the fp32 logit error (kernel-side, margins included)
  double log_error_budget;  // log(ERROR_BUDGET)
  // workspace (allocated by the caller)
  double *xn, *xnorm, *rn, *rnorm, *inv2s2, *lb, *lbe, *lever;  // (B,) (N,) (1,)
  float* rn32;                                                  // (N,)
  // optional terms (null if absent): b_ik = ref_logw[k], or -inf where ref_labels[k] != labels[i]
  const long long* labels;      // (B,) int64
  const long long* ref_labels;  // (N,) int64
  const double* ref_logw;       // (N,)
  float* G;            // (S, B, Cs) GEMM part 2 x.r - ||r||^2 (fp32), then weights
  double* E64;         // (S, B, Cs) exact logits of flagged entries (exact only)
  double *m, *ml, *l, *l64;   // (S, B), initialized by stf_run
  float* scale;        // (S, B)
  float *acc_a, *acc_b;  // (S, B, D) fp32 accumulators (ping-pong)
  double* acc64;       // (S, B, D) float64 accumulator of flagged entries (exact only)
  // outputs
  void* t;             // (B, D) float or double (t_is_double)
  bool t_is_double;
  double* lse;         // (B,)
};

// Launches everything on `stream`. Returns the first launch error (cudaSuccess if none).
cudaError_t stf_run(const StfArgs& a, cudaStream_t stream);

}  // namespace fastdiff_cuda
