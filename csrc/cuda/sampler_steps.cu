// CUDA kernels for the fused sampler steps (fastdiff/ops/sampler_steps.py).
// No torch headers here (they cost ~85 s of nvcc time): plain launchers on raw
// pointers, registered from sampler_steps_launch.cpp.
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;

// out = a x + b u (+ c v), grid-stride over n elements.
template <typename T>
__global__ void affine_kernel(const T* __restrict__ x, const T* __restrict__ u, const T* __restrict__ v,
                              T* __restrict__ out, int64_t n, T a, T b, T c) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    T r = a * x[i] + b * u[i];
    if (v != nullptr) r += c * v[i];
    out[i] = r;
  }
}

// out = x + p (x - D) + q (x' - D'): Heun's correction x + h/2 (d + d').
template <typename T>
__global__ void heun_kernel(const T* __restrict__ x, const T* __restrict__ den, const T* __restrict__ x1,
                            const T* __restrict__ den1, T* __restrict__ out, int64_t n, T p, T q) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const T xi = x[i];
    out[i] = xi + p * (xi - den[i]) + q * (x1[i] - den1[i]);
  }
}

int grid_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t cap = 65535;  // enough blocks to fill any GPU; the loop strides over the rest
  return (int)(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

template <typename T>
cudaError_t launch_affine(const T* x, const T* u, const T* v, T* out, int64_t n, double a, double b, double c,
                          cudaStream_t stream) {
  affine_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(x, u, v, out, n, (T)a, (T)b, (T)c);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_heun(const T* x, const T* den, const T* x1, const T* den1, T* out, int64_t n, double p,
                        double q, cudaStream_t stream) {
  heun_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(x, den, x1, den1, out, n, (T)p, (T)q);
  return cudaGetLastError();
}

}  // namespace

namespace fastdiff_ext {

cudaError_t sampler_affine_cuda_f32(const float* x, const float* u, const float* v, float* out, int64_t n,
                                    double a, double b, double c, cudaStream_t stream) {
  return launch_affine<float>(x, u, v, out, n, a, b, c, stream);
}

cudaError_t sampler_affine_cuda_f64(const double* x, const double* u, const double* v, double* out, int64_t n,
                                    double a, double b, double c, cudaStream_t stream) {
  return launch_affine<double>(x, u, v, out, n, a, b, c, stream);
}

cudaError_t heun_correct_cuda_f32(const float* x, const float* den, const float* x1, const float* den1,
                                  float* out, int64_t n, double p, double q, cudaStream_t stream) {
  return launch_heun<float>(x, den, x1, den1, out, n, p, q, stream);
}

cudaError_t heun_correct_cuda_f64(const double* x, const double* den, const double* x1, const double* den1,
                                  double* out, int64_t n, double p, double q, cudaStream_t stream) {
  return launch_heun<double>(x, den, x1, den1, out, n, p, q, stream);
}

}  // namespace fastdiff_ext
