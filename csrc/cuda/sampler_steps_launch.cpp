// Registers the CUDA kernels of csrc/cuda/sampler_steps.cu for the fastdiff_ext sampler-step
// ops (schemas in csrc/cpu/sampler_steps.cpp).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace fastdiff_ext {

cudaError_t sampler_affine_cuda_f32(const float*, const float*, const float*, float*, int64_t, double, double,
                                    double, cudaStream_t);
cudaError_t sampler_affine_cuda_f64(const double*, const double*, const double*, double*, int64_t, double,
                                    double, double, cudaStream_t);
cudaError_t heun_correct_cuda_f32(const float*, const float*, const float*, const float*, float*, int64_t,
                                  double, double, cudaStream_t);
cudaError_t heun_correct_cuda_f64(const double*, const double*, const double*, const double*, double*,
                                  int64_t, double, double, cudaStream_t);

namespace {

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.is_contiguous() &&
                  t.device() == x.device(),
              "fastdiff_ext: ", name, " must be contiguous with x's shape, dtype and device");
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "fastdiff_ext: x must be a contiguous CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fastdiff_ext: sampler steps run on float32 or float64, got ", x.scalar_type());
}

void sampler_affine_cuda(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& v,
                         double a, double b, double c, at::Tensor& out) {
  check_x(x);
  check_like(u, x, "u");
  check_like(out, x, "out");
  const bool has_v = v.has_value() && v->defined();
  if (has_v) check_like(*v, x, "v");
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  cudaError_t err;
  if (x.scalar_type() == at::kFloat) {
    err = sampler_affine_cuda_f32(x.data_ptr<float>(), u.data_ptr<float>(), has_v ? v->data_ptr<float>() : nullptr,
                                  out.data_ptr<float>(), x.numel(), a, b, c, stream);
  } else {
    err = sampler_affine_cuda_f64(x.data_ptr<double>(), u.data_ptr<double>(),
                                  has_v ? v->data_ptr<double>() : nullptr, out.data_ptr<double>(), x.numel(), a, b,
                                  c, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "fastdiff_ext::sampler_affine launch failed: ", cudaGetErrorString(err));
}

void heun_correct_cuda(const at::Tensor& x, const at::Tensor& denoised, const at::Tensor& x_next,
                       const at::Tensor& denoised_next, double sigma, double sigma_next, at::Tensor& out) {
  check_x(x);
  check_like(denoised, x, "denoised");
  check_like(x_next, x, "x_next");
  check_like(denoised_next, x, "denoised_next");
  check_like(out, x, "out");
  if (x.numel() == 0) return;
  const double half_h = 0.5 * (sigma_next - sigma);
  const double p = half_h / sigma, q = half_h / sigma_next;
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  cudaError_t err;
  if (x.scalar_type() == at::kFloat) {
    err = heun_correct_cuda_f32(x.data_ptr<float>(), denoised.data_ptr<float>(), x_next.data_ptr<float>(),
                                denoised_next.data_ptr<float>(), out.data_ptr<float>(), x.numel(), p, q, stream);
  } else {
    err = heun_correct_cuda_f64(x.data_ptr<double>(), denoised.data_ptr<double>(), x_next.data_ptr<double>(),
                                denoised_next.data_ptr<double>(), out.data_ptr<double>(), x.numel(), p, q,
                                stream);
  }
  TORCH_CHECK(err == cudaSuccess, "fastdiff_ext::heun_correct launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff_ext, CUDA, m) {
  m.impl("sampler_affine", &sampler_affine_cuda);
  m.impl("heun_correct", &heun_correct_cuda);
}

}  // namespace fastdiff_ext
