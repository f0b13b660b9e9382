// CUDA kernel of fastdiff_ext::stf_target (schema in csrc/cpu/stf.cpp): argument
// checks, workspace, and the call into the raw kernels of csrc/cuda/stf.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>

#include "cuda/stf.h"

namespace {

// Must match fastdiff.ops.stf (ERROR_BUDGET, gemm_gamma) and kernels/stf.py (TF32X3_EXTRA).
constexpr double kErrorBudget = 1e-5;

double gemm_gamma(int64_t D) { return std::ldexp(8.0 + 2.0 * std::sqrt(static_cast<double>(D)), -24); }

void stf_target_cuda(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ref,
                     c10::string_view precision, int64_t chunk, at::Tensor t, at::Tensor lse,
                     const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& ref_labels,
                     const std::optional<at::Tensor>& ref_logw) {
  TORCH_CHECK(x.dim() == 2 && ref.dim() == 2 && x.size(1) == ref.size(1),
              "stf_target: x must be (B, D) and ref (N, D)");
  TORCH_CHECK(ref.size(0) > 0, "stf_target: ref is empty");
  TORCH_CHECK(sigma.dim() == 1 && sigma.size(0) == x.size(0) && sigma.scalar_type() == at::kFloat,
              "stf_target: sigma must be (B,) float32");
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), "stf_target: t must be like x");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == x.size(0) && lse.scalar_type() == at::kDouble,
              "stf_target: lse must be (B,) float64");
  TORCH_CHECK(x.is_cuda() && ref.device() == x.device() && sigma.device() == x.device() &&
                  t.device() == x.device() && lse.device() == x.device(),
              "stf_target: all tensors must be on one CUDA device");
  TORCH_CHECK(t.is_contiguous() && lse.is_contiguous(), "stf_target: outputs must be contiguous");
  TORCH_CHECK(labels.has_value() == ref_labels.has_value(), "stf_target: labels and ref_labels go together");
  auto check_term = [&](const std::optional<at::Tensor>& v, const char* name, at::ScalarType dt, int64_t n) {
    TORCH_CHECK(!v.has_value() || (v->dim() == 1 && v->size(0) == n && v->scalar_type() == dt &&
                                   v->is_contiguous() && v->device() == x.device()),
                "stf_target: ", name, " must be a contiguous (", n, ",) ", dt, " tensor on x's device");
  };
  check_term(labels, "labels", at::kLong, x.size(0));
  check_term(ref_labels, "ref_labels", at::kLong, ref.size(0));
  check_term(ref_logw, "ref_logw", at::kDouble, ref.size(0));
  const std::string prec(precision.data(), precision.size());
  int mode;
  if (prec == "highest" || prec == "tf32x3") mode = fastdiff_cuda::kTf32x3;
  else if (prec == "tf32") mode = fastdiff_cuda::kTf32;
  else if (prec == "bf16") mode = fastdiff_cuda::kBf16;
  else TORCH_CHECK(false, "stf_target: precision must be highest, tf32x3, tf32 or bf16, got ", prec);
  const bool exact = prec == "highest";

  const int64_t B = x.size(0), N = ref.size(0), D = x.size(1);
  TORCH_CHECK(B < (1LL << 31) && N < (1LL << 31) && D < (1LL << 31), "stf_target: sizes exceed int32");
  if (B == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  if (D == 0) {  // every logit is 0; the kernels' grids would have a zero dimension and not launch
    TORCH_CHECK(!labels.has_value() && !ref_logw.has_value(),
                "stf_target: D = 0 with labels or ref_logw is answered by fastdiff.stf_target, not this kernel");
    lse.fill_(std::log(static_cast<double>(N)));
    return;
  }

  // float64 inputs stay float64 (the exact pass reads them: x and ref both, if either
  // is); half/bfloat16 upcast exactly to float32.
  const bool is_double = x.scalar_type() == at::kDouble || ref.scalar_type() == at::kDouble;
  const auto work = is_double ? at::kDouble : at::kFloat;
  const at::Tensor xw = x.to(work).contiguous();
  const at::Tensor rw = ref.to(work).contiguous();
  const at::Tensor sw = sigma.contiguous();

  const fastdiff_cuda::StfPlan plan = fastdiff_cuda::stf_plan(
      static_cast<int>(B), static_cast<int>(N), static_cast<int>(D), chunk, exact, x.device().index());
  const int64_t S = plan.S, Cs = plan.Cs;
  const auto f64 = x.options().dtype(at::kDouble);
  const auto f32 = x.options().dtype(at::kFloat);
  // one float64 buffer for the (B,), (N,) and (S, B) vectors
  at::Tensor vec64 = at::empty({5 * B + 2 * N + 1 + 4 * S * B}, f64);
  at::Tensor vec32 = at::empty({N + S * B}, f32);
  at::Tensor G = at::empty({S, B, Cs}, f32);
  at::Tensor E64 = exact ? at::empty({S, B, Cs}, f64) : at::Tensor();
  at::Tensor acc_a = at::empty({S, B, D}, f32), acc_b = at::empty({S, B, D}, f32);
  at::Tensor acc64 = exact ? at::empty({S, B, D}, f64) : at::Tensor();
  const bool t_direct = t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
  at::Tensor t_work = t_direct ? t : at::empty({B, D}, f32);

  fastdiff_cuda::StfArgs a{};
  a.x = xw.data_ptr();
  a.ref = rw.data_ptr();
  a.sigma = sw.data_ptr<float>();
  a.is_double = is_double;
  a.B = static_cast<int>(B);
  a.N = static_cast<int>(N);
  a.D = static_cast<int>(D);
  a.plan = plan;
  a.mode = mode;
  a.exact = exact;
  a.gamma = 2.0 * (gemm_gamma(D) + std::ldexp(32.0, -24));  // as kernels/stf.py
  a.log_error_budget = std::log(kErrorBudget);
  double* p = vec64.data_ptr<double>();
  a.xn = p; p += B;
  a.xnorm = p; p += B;
  a.inv2s2 = p; p += B;
  a.lb = p; p += B;
  a.lbe = p; p += B;
  a.rn = p; p += N;
  a.rnorm = p; p += N;
  a.lever = p; p += 1;
  a.m = p; p += S * B;
  a.ml = p; p += S * B;
  a.l = p; p += S * B;
  a.l64 = p;
  float* q = vec32.data_ptr<float>();
  a.rn32 = q; q += N;
  a.scale = q;
  a.labels = labels.has_value() ? reinterpret_cast<const long long*>(labels->data_ptr<int64_t>()) : nullptr;
  a.ref_labels = ref_labels.has_value() ? reinterpret_cast<const long long*>(ref_labels->data_ptr<int64_t>())
                                        : nullptr;
  a.ref_logw = ref_logw.has_value() ? ref_logw->data_ptr<double>() : nullptr;
  a.G = G.data_ptr<float>();
  a.E64 = exact ? E64.data_ptr<double>() : nullptr;
  a.acc_a = acc_a.data_ptr<float>();
  a.acc_b = acc_b.data_ptr<float>();
  a.acc64 = exact ? acc64.data_ptr<double>() : nullptr;
  a.t = t_work.data_ptr();
  a.t_is_double = t_work.scalar_type() == at::kDouble;
  a.lse = lse.data_ptr<double>();
  const cudaError_t err = fastdiff_cuda::stf_run(a, stream);
  TORCH_CHECK(err == cudaSuccess, "stf_target: CUDA launch failed: ", cudaGetErrorString(err));
  if (!t_direct) t.copy_(t_work);
}

}  // namespace

// The C++ signature must match the CPU kernel's (csrc/cpu/stf.cpp): outputs by value.
TORCH_LIBRARY_IMPL(fastdiff_ext, CUDA, m) { m.impl("stf_target", &stf_target_cuda); }
