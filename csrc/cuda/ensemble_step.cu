// CUDA kernel of ensemble_step: each thread gathers V features of one trajectory through the
// CSR list (no atomics), applies the sampler update and scatters the result into the next
// packed input. The CSR's indices are not checked here: that would need a device-to-host copy
// (a sync per sampler step) or device asserts, which poison the process's CUDA context. The
// Python wrapper checks each list on the host once (ops.py); the kernel only keeps its memory
// accesses in range: a trajectory with a bad index gets NaN, a packed row listed twice is
// written twice with the same value, and a packed row never listed is left unwritten.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "../checks.h"
#include "utils.cuh"

namespace ensattr_fast {
namespace {

constexpr const char* kOp = "ensemble_step";
constexpr int kGatherDepth = 4;  // member rows loaded before the first is used

// The sampler's scalars, converted once to the accumulate type.
template <typename acc_t>
struct StepCoefficients {
  acc_t a, b, c, d, s, lo, hi;
};

// eb += sum_j weights[j] eps[rows[j], f : f + V] over j in [begin, end), in order of j, with
// kGatherDepth rows in flight per thread. False if a row is out of range (the caller then
// writes NaN).
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ bool gather(const scalar_t* __restrict__ eps,
                                       const int64_t* __restrict__ rows,
                                       const acc_t* __restrict__ weights, int64_t begin,
                                       int64_t end, int64_t P, int64_t D, int64_t f, acc_t* eb) {
  bool ok = true;
  int64_t j = begin;
  for (; j + kGatherDepth <= end; j += kGatherDepth) {
    int64_t r[kGatherDepth];
    acc_t w[kGatherDepth];
    Vec<scalar_t, V> e[kGatherDepth];
#pragma unroll
    for (int u = 0; u < kGatherDepth; ++u) {
      r[u] = rows[j + u];
      w[u] = weights[j + u];
    }
#pragma unroll
    for (int u = 0; u < kGatherDepth; ++u) {
      const bool in = 0 <= r[u] && r[u] < P;
      ok = ok && in;
      e[u] = in ? load_vec<V>(eps + r[u] * D + f) : Vec<scalar_t, V>{};
    }
#pragma unroll
    for (int u = 0; u < kGatherDepth; ++u)
#pragma unroll
      for (int c = 0; c < V; ++c) eb[c] += w[u] * static_cast<acc_t>(e[u].v[c]);
  }
  for (; j < end; ++j) {
    const int64_t r = rows[j];
    if (r < 0 || r >= P) {
      ok = false;
      continue;
    }
    const acc_t w = weights[j];
    const auto e = load_vec<V>(eps + r * D + f);
#pragma unroll
    for (int c = 0; c < V; ++c) eb[c] += w * static_cast<acc_t>(e.v[c]);
  }
  return ok;
}

// Block of (bx, by) threads, bx * by = kThreads: threadIdx.y picks a trajectory t and
// threadIdx.x a vector of V features (grid-stride over both), so that a warp works on one
// trajectory (its CSR entries are one broadcast load) and reads consecutive features of each
// member row.
template <typename scalar_t, typename acc_t, int V>
__global__ void ensemble_step_kernel(
    const scalar_t* __restrict__ eps, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ noise, const int64_t* __restrict__ sample_of,
    const int64_t* __restrict__ row_ptr, const int64_t* __restrict__ rows,
    const acc_t* __restrict__ weights, int64_t T, int64_t D, int64_t P, int64_t R, bool has_noise,
    int64_t noise_rows, StepCoefficients<acc_t> k, scalar_t* __restrict__ x_next,
    scalar_t* __restrict__ eps_bar, scalar_t* __restrict__ packed) {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t vectors = D / V;
  for (int64_t t = int64_t{blockIdx.y} * blockDim.y + threadIdx.y; t < T;
       t += int64_t{gridDim.y} * blockDim.y) {
    const int64_t begin = row_ptr[t], end = row_ptr[t + 1];
    const bool csr_ok = 0 <= begin && begin <= end && end <= R;
    const int64_t z = has_noise ? (sample_of != nullptr ? sample_of[t] : t) : 0;
    const bool z_ok = 0 <= z && z < noise_rows;
    for (int64_t v = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; v < vectors;
         v += int64_t{gridDim.x} * blockDim.x) {
      const int64_t f = v * V, i = t * D + f;
      acc_t eb[V];
#pragma unroll
      for (int c = 0; c < V; ++c) eb[c] = 0;
      const bool ok =
          csr_ok && gather<scalar_t, acc_t, V>(eps, rows, weights, begin, end, P, D, f, eb);
      const auto xv = load_vec<V>(x + i);
      Vec<scalar_t, V> zv;
      if (has_noise && z_ok) zv = load_vec<V>(noise + z * D + f);
      Vec<scalar_t, V> out, eb_out;
#pragma unroll
      for (int c = 0; c < V; ++c) {
        const acc_t e = ok ? eb[c] : nan;
        const acc_t xt = static_cast<acc_t>(xv.v[c]);
        // Comparisons with the unclipped value first keep NaN, as std::min(std::max(u, lo), hi).
        acc_t x0 = k.a * xt + k.b * e;
        x0 = x0 < k.lo ? k.lo : x0;
        x0 = k.hi < x0 ? k.hi : x0;
        acc_t xn = k.c * x0 + k.d * xt;
        if (has_noise) xn += k.s * (z_ok ? static_cast<acc_t>(zv.v[c]) : nan);
        out.v[c] = static_cast<scalar_t>(xn);
        eb_out.v[c] = static_cast<scalar_t>(e);
      }
      store_vec<V>(x_next + i, out);
      store_vec<V>(eps_bar + i, eb_out);
      if (packed != nullptr && csr_ok) {
        for (int64_t j = begin; j < end; ++j) {
          const int64_t r = rows[j];
          if (0 <= r && r < P) store_vec<V>(packed + r * D + f, out);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_step_cuda(
    const at::Tensor& member_eps_, const at::Tensor& x_, const std::optional<at::Tensor>& noise_,
    const std::optional<at::Tensor>& sample_of_, const at::Tensor& row_ptr_,
    const at::Tensor& rows_, const at::Tensor& weights_, double a, double b, double c, double d,
    double s, double clip_min, double clip_max, bool write_packed) {
  const auto shape = check_ensemble_step(kOp, member_eps_, x_, noise_, sample_of_, row_ptr_, rows_,
                                         weights_, write_packed);
  c10::cuda::CUDAGuard guard(x_.device());
  const auto member_eps = member_eps_.contiguous(), x = x_.contiguous();
  const auto row_ptr = row_ptr_.contiguous(), rows = rows_.contiguous();
  const auto weights = weights_.contiguous();
  const auto noise = noise_.has_value() ? std::optional(noise_->contiguous()) : std::nullopt;
  const auto sample_of =
      sample_of_.has_value() ? std::optional(sample_of_->contiguous()) : std::nullopt;

  const int64_t T = shape.trajectories, D = shape.dim;
  auto x_next = at::empty({T, D}, x.options());
  auto eps_bar = at::empty({T, D}, x.options());
  auto packed = at::empty({write_packed ? shape.packed : 0, D}, x.options());
  if (T * D == 0) return {x_next, eps_bar, packed};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ensemble_step_cuda",
                                  [&] {
    using acc_t = opmath_t<scalar_t>;
    const StepCoefficients<acc_t> k{static_cast<acc_t>(a),       static_cast<acc_t>(b),
                                    static_cast<acc_t>(c),       static_cast<acc_t>(d),
                                    static_cast<acc_t>(s),       static_cast<acc_t>(clip_min),
                                    static_cast<acc_t>(clip_max)};
    const scalar_t* eps_p = member_eps.const_data_ptr<scalar_t>();
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    const scalar_t* noise_p = noise ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* next_p = x_next.mutable_data_ptr<scalar_t>();
    scalar_t* bar_p = eps_bar.mutable_data_ptr<scalar_t>();
    scalar_t* packed_p = write_packed ? packed.mutable_data_ptr<scalar_t>() : nullptr;
    const auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t vectors = D / V;
      int bx = kWarpSize;  // threads along the features of one trajectory
      while (bx < kThreads && bx < vectors) bx *= 2;
      const dim3 block(bx, kThreads / bx);
      const dim3 grid(blocks_for(vectors, bx), grid_y_for((T + block.y - 1) / block.y));
      ensemble_step_kernel<scalar_t, acc_t, V><<<grid, block, 0, stream>>>(
          eps_p, x_p, noise_p, sample_of ? sample_of->const_data_ptr<int64_t>() : nullptr,
          row_ptr.const_data_ptr<int64_t>(), rows.const_data_ptr<int64_t>(),
          weights.const_data_ptr<acc_t>(), T, D, shape.packed, shape.entries, shape.has_noise,
          shape.noise_rows, k, next_p, bar_p, packed_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int V16 = kVec16<scalar_t>;
    if (D % V16 == 0 && aligned16({eps_p, x_p, noise_p, next_p, bar_p, packed_p})) {
      launch(std::integral_constant<int, V16>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {x_next, eps_bar, packed};
}

}  // namespace

TORCH_LIBRARY_IMPL(ensattr_fast, CUDA, m) { m.impl("ensemble_step", &ensemble_step_cuda); }

}  // namespace ensattr_fast
