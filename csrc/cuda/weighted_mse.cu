// CUDA kernels of fastdiff_ext::weighted_mse (registered in weighted_mse_launch.cpp;
// no torch headers here, so this file compiles in seconds).
//
//   loss = sum_j w_j (pred_j - target_j)^2 / n,  grad_j = 2 w_j (pred_j - target_j) / n
//
// pred/target/grad are (R, D) row-major, weight (R,) in the accumulation type A
// (double for double pred, float otherwise). Two launches, no atomics:
//   pass 1: each block covers a fixed tile of kTile(P) elements, reads pred and
//           target once (16-byte vector loads when aligned), writes the gradient,
//           reduces its tile in A (thread, warp shuffles, then warps in order) and
//           stores one double partial;
//   pass 2: one block adds the partials in a fixed order in double and writes the loss.
// The element-to-thread map and every reduction order depend only on n and the
// dtype (not on alignment, the device or scheduling): the loss is bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace {

constexpr int kThreads = 256;  // threads per block of pass 1
constexpr int kIters = 2;      // vectors per thread of pass 1
constexpr int kSumThreads = 512;

template <typename X, int V>
struct alignas(sizeof(X) * V) Pack {
  X v[V];
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename P, typename A>
__device__ __forceinline__ P from_acc(A x);
template <>
__device__ __forceinline__ float from_acc<float, float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ double from_acc<double, double>(double x) { return x; }

// Elements per thread-vector: 16 bytes of pred.
template <typename P>
__host__ __device__ constexpr int vec_of() { return 16 / int(sizeof(P)); }
template <typename P>
__host__ __device__ constexpr int64_t tile_of() { return int64_t(kThreads) * kIters * vec_of<P>(); }

// Sum over the block in a fixed order; the result is valid in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? warp_sums[lane] : A(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

template <typename P, typename T, typename A, bool kGrad, bool kAligned>
__global__ void __launch_bounds__(kThreads)
weighted_mse_pass1(const P* __restrict__ pred, const T* __restrict__ target, const A* __restrict__ weight,
                   P* __restrict__ grad, double* __restrict__ partial, int64_t n, int64_t d, A scale) {
  constexpr int V = vec_of<P>();
  const int64_t tile_begin = int64_t(blockIdx.x) * tile_of<P>();
  const bool small = n < (int64_t(1) << 31);

  Pack<P, V> p[kIters];
  Pack<T, V> t[kIters];
  int64_t base[kIters];
  // All loads first, so 2 * kIters vectors per thread are in flight.
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
    base[k] = tile_begin + (int64_t(k) * kThreads + threadIdx.x) * V;
    if (kAligned && base[k] + V <= n) {
      p[k] = *reinterpret_cast<const Pack<P, V>*>(pred + base[k]);
      t[k] = *reinterpret_cast<const Pack<T, V>*>(target + base[k]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (base[k] + j < n) {
          p[k].v[j] = pred[base[k] + j];
          t[k].v[j] = target[base[k] + j];
        }
      }
    }
  }

  A acc = 0;
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
    if (base[k] >= n) break;
    // Row of the vector's first element, then step along: one division per vector.
    int64_t row, col;
    if (small) {
      row = int64_t(uint32_t(base[k]) / uint32_t(d));
    } else {
      row = base[k] / d;
    }
    col = base[k] - row * d;
    A w = weight[row];
    Pack<P, V> g;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (base[k] + j < n) {
        if (col == d) {
          col = 0;
          w = weight[++row];
        }
        ++col;
        const A diff = to_acc(p[k].v[j]) - to_acc(t[k].v[j]);
        const A wdiff = w * diff;
        acc += wdiff * diff;
        if (kGrad) g.v[j] = from_acc<P, A>(wdiff * scale);
      }
    }
    if (kGrad) {
      if (kAligned && base[k] + V <= n) {
        *reinterpret_cast<Pack<P, V>*>(grad + base[k]) = g;
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (base[k] + j < n) grad[base[k] + j] = g.v[j];
        }
      }
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = double(acc);
}

template <typename A>
__global__ void __launch_bounds__(kSumThreads)
weighted_mse_pass2(const double* __restrict__ partial, int64_t m, int64_t n, A* __restrict__ loss) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += kSumThreads) s += partial[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *loss = A(s / double(n));
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename P, typename T>
int launch(const void* pred, const void* target, const void* weight, void* grad, void* loss, double* partial,
           int64_t n, int64_t d, bool need_grad, cudaStream_t stream) {
  using A = typename std::conditional<std::is_same<P, double>::value, double, float>::type;
  constexpr int V = vec_of<P>();
  const int64_t blocks = (n + tile_of<P>() - 1) / tile_of<P>();
  const A scale = A(2.0 / double(n));
  const bool vec = aligned(pred, sizeof(P) * V) && aligned(target, sizeof(T) * V) &&
                   (!need_grad || aligned(grad, sizeof(P) * V));
  auto p = static_cast<const P*>(pred);
  auto t = static_cast<const T*>(target);
  auto w = static_cast<const A*>(weight);
  auto g = static_cast<P*>(grad);
  const dim3 grid(static_cast<unsigned>(blocks));
  if (need_grad) {
    if (vec) weighted_mse_pass1<P, T, A, true, true><<<grid, kThreads, 0, stream>>>(p, t, w, g, partial, n, d, scale);
    else weighted_mse_pass1<P, T, A, true, false><<<grid, kThreads, 0, stream>>>(p, t, w, g, partial, n, d, scale);
  } else {
    if (vec) weighted_mse_pass1<P, T, A, false, true><<<grid, kThreads, 0, stream>>>(p, t, w, g, partial, n, d, scale);
    else weighted_mse_pass1<P, T, A, false, false><<<grid, kThreads, 0, stream>>>(p, t, w, g, partial, n, d, scale);
  }
  weighted_mse_pass2<A><<<1, kSumThreads, 0, stream>>>(partial, blocks, n, static_cast<A*>(loss));
  return static_cast<int>(cudaGetLastError());
}

template <typename P>
int launch_target(bool target_is_float, const void* pred, const void* target, const void* weight, void* grad,
                  void* loss, double* partial, int64_t n, int64_t d, bool need_grad, cudaStream_t stream) {
  if (target_is_float) return launch<P, float>(pred, target, weight, grad, loss, partial, n, d, need_grad, stream);
  return launch<P, P>(pred, target, weight, grad, loss, partial, n, d, need_grad, stream);
}

}  // namespace

// dtype codes: 0 float32, 1 float16, 2 bfloat16, 3 float64.

// Length of the double workspace `partial` that fastdiff_weighted_mse_cuda needs.
extern "C" int64_t fastdiff_weighted_mse_cuda_partials(int dtype, int64_t n) {
  int64_t tile = dtype == 0 ? tile_of<float>() : dtype == 3 ? tile_of<double>() : tile_of<__half>();
  return (n + tile - 1) / tile;
}

// Returns a cudaError_t (0 on success), or -1 for an unknown dtype code.
extern "C" int fastdiff_weighted_mse_cuda(int dtype, bool target_is_float, const void* pred, const void* target,
                                          const void* weight, void* grad, void* loss, double* partial, int64_t n,
                                          int64_t d, bool need_grad, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch<float, float>(pred, target, weight, grad, loss, partial, n, d, need_grad, stream);
    case 1: return launch_target<__half>(target_is_float, pred, target, weight, grad, loss, partial, n, d, need_grad, stream);
    case 2: return launch_target<__nv_bfloat16>(target_is_float, pred, target, weight, grad, loss, partial, n, d, need_grad, stream);
    case 3: return launch_target<double>(target_is_float, pred, target, weight, grad, loss, partial, n, d, need_grad, stream);
    default: return -1;
  }
}
