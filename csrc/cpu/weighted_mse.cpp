// fastdiff_ext::weighted_mse: the schema and the CPU kernel.
//
//   loss = sum_j w_j (pred_j - target_j)^2 / n,  grad_j = 2 w_j (pred_j - target_j) / n
//
// in one pass over pred and target (see fastdiff/ops/weighted_mse.py for the
// backend contract). pred and target are (R, D) contiguous, weight (R,) in the
// accumulation type A (double for double pred, float otherwise), one weight per
// row of D consecutive elements.
//
// Determinism: the n elements are cut into fixed chunks of kChunk elements
// (independent of the thread count); each chunk is summed in A over kLanes
// interleaved lanes (a loop the compiler vectorizes without reassociating),
// its rows' sums are weighted and added in double, and the chunk partials are
// added in double in chunk order. The result is bitwise reproducible.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fastdiff_ext {
namespace {

constexpr int64_t kChunk = int64_t(1) << 14;  // elements per partial sum
constexpr int kLanes = 16;                     // independent accumulators

template <typename A>
inline A lane_total(const A* acc) {
  A s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// sum_j (p_j - t_j)^2 over one run of equal weight; writes g_j = coef (p_j - t_j).
template <typename P, typename T, typename A, bool kGrad>
A run_sum(const P* __restrict__ p, const T* __restrict__ t, P* __restrict__ g, int64_t len, A coef) {
  A acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A diff = static_cast<A>(p[j + l]) - static_cast<A>(t[j + l]);
      acc[l] += diff * diff;
      if (kGrad) g[j + l] = static_cast<P>(coef * diff);
    }
  }
  for (int l = 0; j < len; ++j, ++l) {
    const A diff = static_cast<A>(p[j]) - static_cast<A>(t[j]);
    acc[l] += diff * diff;
    if (kGrad) g[j] = static_cast<P>(coef * diff);
  }
  return lane_total(acc);
}

// D == 1 (a weight per element): sum_j w_j (p_j - t_j)^2.
template <typename P, typename T, typename A, bool kGrad>
A elementwise_sum(const P* __restrict__ p, const T* __restrict__ t, const A* __restrict__ w,
                  P* __restrict__ g, int64_t len, A scale) {
  A acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A diff = static_cast<A>(p[j + l]) - static_cast<A>(t[j + l]);
      const A wd = w[j + l] * diff;
      acc[l] += wd * diff;
      if (kGrad) g[j + l] = static_cast<P>(scale * wd);
    }
  }
  for (int l = 0; j < len; ++j, ++l) {
    const A diff = static_cast<A>(p[j]) - static_cast<A>(t[j]);
    const A wd = w[j] * diff;
    acc[l] += wd * diff;
    if (kGrad) g[j] = static_cast<P>(scale * wd);
  }
  return lane_total(acc);
}

template <typename P, typename T, typename A, bool kGrad>
double chunk_sum(const P* p, const T* t, const A* w, P* g, int64_t begin, int64_t end, int64_t d,
                 A scale) {
  if (d == 1) {
    return static_cast<double>(
        elementwise_sum<P, T, A, kGrad>(p + begin, t + begin, w + begin, kGrad ? g + begin : nullptr,
                                        end - begin, scale));
  }
  double sum = 0.0;
  for (int64_t i = begin; i < end;) {
    const int64_t r = i / d;
    const int64_t stop = std::min(end, (r + 1) * d);
    const A wr = w[r];
    const A s = run_sum<P, T, A, kGrad>(p + i, t + i, kGrad ? g + i : nullptr, stop - i, wr * scale);
    sum += static_cast<double>(wr) * static_cast<double>(s);
    i = stop;
  }
  return sum;
}

template <typename P, typename T>
void weighted_mse_typed(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                        const at::Tensor& loss, const at::Tensor& grad, bool need_grad) {
  using A = std::conditional_t<std::is_same_v<P, double>, double, float>;
  const P* p = pred.const_data_ptr<P>();
  const T* t = target.const_data_ptr<T>();
  const A* w = weight.const_data_ptr<A>();
  P* g = need_grad ? grad.mutable_data_ptr<P>() : nullptr;
  const int64_t n = pred.numel();
  const int64_t d = pred.size(1);
  const A scale = static_cast<A>(2.0 / static_cast<double>(n));
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t end = std::min(n, begin + kChunk);
      partial[c] = need_grad ? chunk_sum<P, T, A, true>(p, t, w, g, begin, end, d, scale)
                             : chunk_sum<P, T, A, false>(p, t, w, g, begin, end, d, scale);
    }
  });
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c];
  *loss.mutable_data_ptr<A>() = static_cast<A>(total / static_cast<double>(n));
}

template <typename P>
void dispatch_target(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                     const at::Tensor& loss, const at::Tensor& grad, bool need_grad) {
  if (target.scalar_type() == pred.scalar_type()) {
    weighted_mse_typed<P, P>(pred, target, weight, loss, grad, need_grad);
  } else {
    weighted_mse_typed<P, float>(pred, target, weight, loss, grad, need_grad);
  }
}

}  // namespace

// Checks shared by the CPU and CUDA kernels: the backend contract.
void weighted_mse_check(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                        const at::Tensor& loss, const at::Tensor& grad, bool need_grad) {
  const auto pt = pred.scalar_type();
  TORCH_CHECK(pt == at::kFloat || pt == at::kHalf || pt == at::kBFloat16 || pt == at::kDouble,
              "weighted_mse: pred must be float32, float16, bfloat16 or float64, got ", pt);
  const auto acc = pt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(pred.dim() == 2 && pred.is_contiguous(), "weighted_mse: pred must be a contiguous (R, D) tensor");
  TORCH_CHECK(target.sizes() == pred.sizes() && target.is_contiguous(),
              "weighted_mse: target must be contiguous with pred's shape");
  TORCH_CHECK(target.scalar_type() == pt || target.scalar_type() == at::kFloat,
              "weighted_mse: target must have pred's dtype or float32, got ", target.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == pred.size(0) && weight.is_contiguous() &&
                  weight.scalar_type() == acc,
              "weighted_mse: weight must be a contiguous (R,) tensor of dtype ", acc);
  TORCH_CHECK(loss.dim() == 0 && loss.scalar_type() == acc, "weighted_mse: loss must be a 0-d ", acc, " tensor");
  TORCH_CHECK(!need_grad || (grad.sizes() == pred.sizes() && grad.is_contiguous() && grad.scalar_type() == pt),
              "weighted_mse: grad must be a contiguous tensor with pred's shape and dtype");
  TORCH_CHECK(pred.numel() > 0, "weighted_mse: pred is empty");
  for (const at::Tensor* x : {&target, &weight, &loss}) {
    TORCH_CHECK(x->device() == pred.device(), "weighted_mse: all tensors must be on pred's device");
  }
  TORCH_CHECK(!need_grad || grad.device() == pred.device(), "weighted_mse: grad must be on pred's device");
}

void weighted_mse_cpu(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                      const at::Tensor& loss, const at::Tensor& grad, bool need_grad) {
  weighted_mse_check(pred, target, weight, loss, grad, need_grad);
  switch (pred.scalar_type()) {
    case at::kFloat: return dispatch_target<float>(pred, target, weight, loss, grad, need_grad);
    case at::kDouble: return dispatch_target<double>(pred, target, weight, loss, grad, need_grad);
    case at::kHalf: return dispatch_target<c10::Half>(pred, target, weight, loss, grad, need_grad);
    case at::kBFloat16: return dispatch_target<c10::BFloat16>(pred, target, weight, loss, grad, need_grad);
    default: TORCH_CHECK(false, "weighted_mse: unsupported dtype ", pred.scalar_type());
  }
}

}  // namespace fastdiff_ext

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("weighted_mse(Tensor pred, Tensor target, Tensor weight, Tensor(a!) loss, Tensor(b!) grad, "
        "bool need_grad) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) {
  m.impl("weighted_mse", &fastdiff_ext::weighted_mse_cpu);
}
