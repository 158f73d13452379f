// CUDA kernel of ensemble_step: each thread gathers one feature of one trajectory
// through the CSR list (no atomics), applies the sampler update and scatters the
// result into the next packed input.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "utils.cuh"

namespace ensattr_fast {
namespace {

constexpr const char* kOp = "ensemble_step";

// The sampler's scalars, converted once to the accumulate type.
template <typename acc_t>
struct StepCoefficients {
  acc_t a, b, c, d, s, lo, hi;
};

// One thread per (t, d), flattened as t * D + d (grid-stride), so that small D does not
// idle threads; threads of one trajectory read consecutive features of the same rows.
// Index checks are device asserts here (the CPU kernel validates on the host).
template <typename scalar_t, typename acc_t>
__global__ void ensemble_step_kernel(
    const scalar_t* __restrict__ eps, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ noise, const int64_t* __restrict__ sample_of,
    const int64_t* __restrict__ row_ptr, const int64_t* __restrict__ rows,
    const acc_t* __restrict__ weights, int64_t T, int64_t D, int64_t P, int64_t R,
    bool has_noise, int64_t noise_rows, StepCoefficients<acc_t> k, scalar_t* __restrict__ x_next,
    scalar_t* __restrict__ eps_bar, scalar_t* __restrict__ packed) {
  const int64_t total = T * D, stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t t = i / D, f = i - t * D;
    const int64_t begin = row_ptr[t], end = row_ptr[t + 1];
    CUDA_KERNEL_ASSERT_MSG(0 <= begin && begin <= end && end <= R,
                           "ensemble_step: row_ptr must be non-decreasing within [0, len(rows)]");
    acc_t eb = 0;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = rows[j];
      CUDA_KERNEL_ASSERT_MSG(0 <= r && r < P, "ensemble_step: rows out of range of member_eps");
      eb += weights[j] * static_cast<acc_t>(eps[r * D + f]);
    }
    const acc_t xt = static_cast<acc_t>(x[i]);
    // Comparisons with the unclipped value first keep NaN, as std::min(std::max(u, lo), hi).
    acc_t x0 = k.a * xt + k.b * eb;
    x0 = x0 < k.lo ? k.lo : x0;
    x0 = k.hi < x0 ? k.hi : x0;
    acc_t xn = k.c * x0 + k.d * xt;
    if (has_noise) {
      const int64_t z = sample_of != nullptr ? sample_of[t] : t;
      CUDA_KERNEL_ASSERT_MSG(0 <= z && z < noise_rows,
                             "ensemble_step: sample_of out of range of noise");
      xn += k.s * static_cast<acc_t>(noise[z * D + f]);
    }
    const scalar_t out = static_cast<scalar_t>(xn);
    x_next[i] = out;
    eps_bar[i] = static_cast<scalar_t>(eb);
    if (packed != nullptr) {
      for (int64_t j = begin; j < end; ++j) packed[rows[j] * D + f] = out;
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "ensemble_step_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const StepCoefficients<acc_t> k{static_cast<acc_t>(a),        static_cast<acc_t>(b),
                                    static_cast<acc_t>(c),        static_cast<acc_t>(d),
                                    static_cast<acc_t>(s),        static_cast<acc_t>(clip_min),
                                    static_cast<acc_t>(clip_max)};
    ensemble_step_kernel<<<blocks_for(T * D), kThreads, 0, stream>>>(
        member_eps.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        noise ? noise->const_data_ptr<scalar_t>() : nullptr,
        sample_of ? sample_of->const_data_ptr<int64_t>() : nullptr,
        row_ptr.const_data_ptr<int64_t>(), rows.const_data_ptr<int64_t>(),
        weights.const_data_ptr<acc_t>(), T, D, shape.packed, shape.entries, shape.has_noise,
        shape.noise_rows, k,
        x_next.mutable_data_ptr<scalar_t>(), eps_bar.mutable_data_ptr<scalar_t>(),
        write_packed ? packed.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_next, eps_bar, packed};
}

}  // namespace

TORCH_LIBRARY_IMPL(ensattr_fast, CUDA, m) { m.impl("ensemble_step", &ensemble_step_cuda); }

}  // namespace ensattr_fast
