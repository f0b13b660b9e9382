// CUDA registration of fastdiff_ext::weighted_mse (schema in csrc/cpu/weighted_mse.cpp,
// kernels in weighted_mse.cu, which stays free of torch headers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

extern "C" int64_t fastdiff_weighted_mse_cuda_partials(int dtype, int64_t n);
extern "C" int fastdiff_weighted_mse_cuda(int dtype, bool target_is_float, const void* pred, const void* target,
                                          const void* weight, void* grad, void* loss, double* partial, int64_t n,
                                          int64_t d, bool need_grad, cudaStream_t stream);

namespace fastdiff_ext {

// csrc/cpu/weighted_mse.cpp: the backend contract, shared with the CPU kernel.
void weighted_mse_check(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                        const at::Tensor& loss, const at::Tensor& grad, bool need_grad);

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "weighted_mse: unsupported dtype ", t);
  }
}

void weighted_mse_cuda(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                       const at::Tensor& loss, const at::Tensor& grad, bool need_grad) {
  weighted_mse_check(pred, target, weight, loss, grad, need_grad);
  TORCH_CHECK(pred.is_cuda(), "weighted_mse: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(pred.device());
  const int code = dtype_code(pred.scalar_type());
  const int64_t n = pred.numel();
  const at::Tensor partial =
      at::empty({fastdiff_weighted_mse_cuda_partials(code, n)}, pred.options().dtype(at::kDouble));
  const int err = fastdiff_weighted_mse_cuda(
      code, target.scalar_type() != pred.scalar_type(), pred.const_data_ptr(), target.const_data_ptr(),
      weight.const_data_ptr(), need_grad ? grad.mutable_data_ptr() : nullptr, loss.mutable_data_ptr(),
      partial.mutable_data_ptr<double>(), n, pred.size(1), need_grad, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "weighted_mse: CUDA launch failed: ",
              err > 0 ? cudaGetErrorString(static_cast<cudaError_t>(err)) : "unknown dtype");
}

}  // namespace
}  // namespace fastdiff_ext

TORCH_LIBRARY_IMPL(fastdiff_ext, CUDA, m) {
  m.impl("weighted_mse", &fastdiff_ext::weighted_mse_cuda);
}
