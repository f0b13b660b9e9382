// Fused sampler steps (fastdiff/ops/sampler_steps.py): the op schemas and the CPU kernels.
//   sampler_affine: out = a x + b u (+ c v)
//   heun_correct:   out = x + p (x - D) + q (x' - D'),  p = h / (2 sigma), q = h / (2 sigma_next)
// Tensors are contiguous, one dtype (float32 or float64), one shape; computed in that dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

namespace fastdiff_ext {
namespace {

constexpr int64_t kGrain = 1 << 15;

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.is_contiguous(),
              "fastdiff_ext: ", name, " must be contiguous with x's shape and dtype");
}

void sampler_affine_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& v,
                        double a, double b, double c, at::Tensor& out) {
  TORCH_CHECK(x.is_contiguous(), "fastdiff_ext: x must be contiguous");
  check_like(u, x, "u");
  check_like(out, x, "out");
  const bool has_v = v.has_value() && v->defined();
  if (has_v) check_like(*v, x, "v");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sampler_affine_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* vp = has_v ? v->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t sa = static_cast<scalar_t>(a), sb = static_cast<scalar_t>(b), sc = static_cast<scalar_t>(c);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      if (vp) {
        for (int64_t i = lo; i < hi; ++i) op[i] = sa * xp[i] + sb * up[i] + sc * vp[i];
      } else {
        for (int64_t i = lo; i < hi; ++i) op[i] = sa * xp[i] + sb * up[i];
      }
    });
  });
}

void heun_correct_cpu(const at::Tensor& x, const at::Tensor& denoised, const at::Tensor& x_next,
                      const at::Tensor& denoised_next, double sigma, double sigma_next, at::Tensor& out) {
  TORCH_CHECK(x.is_contiguous(), "fastdiff_ext: x must be contiguous");
  check_like(denoised, x, "denoised");
  check_like(x_next, x, "x_next");
  check_like(denoised_next, x, "denoised_next");
  check_like(out, x, "out");
  const double half_h = 0.5 * (sigma_next - sigma);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "heun_correct_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = denoised.data_ptr<scalar_t>();
    const scalar_t* x1p = x_next.data_ptr<scalar_t>();
    const scalar_t* d1p = denoised_next.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t p = static_cast<scalar_t>(half_h / sigma), q = static_cast<scalar_t>(half_h / sigma_next);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) op[i] = xp[i] + p * (xp[i] - dp[i]) + q * (x1p[i] - d1p[i]);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("sampler_affine(Tensor x, Tensor u, Tensor? v, float a, float b, float c, Tensor(a!) out) -> ()");
  m.def("heun_correct(Tensor x, Tensor denoised, Tensor x_next, Tensor denoised_next, float sigma, "
        "float sigma_next, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) {
  m.impl("sampler_affine", &sampler_affine_cpu);
  m.impl("heun_correct", &heun_correct_cpu);
}

}  // namespace fastdiff_ext
