// CUDA kernels of masked_member_mse: a warp reduces each (m, b) row over D, a block
// per member reduces over B; the backward is one elementwise pass over pred/target.
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

// One warp per row r = (m, b) (grid-stride over rows), lanes over d:
// per_example[r] = sum_d (pred[r,d] - target[r or r % B, d])^2 / max(D, 1).
template <typename scalar_t, typename acc_t>
__global__ void squared_error_rows_kernel(const scalar_t* __restrict__ pred,
                                          const scalar_t* __restrict__ target, int64_t rows,
                                          int64_t B, int64_t D, bool broadcast, acc_t inv_d,
                                          acc_t* __restrict__ per_example) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / kWarpSize);
  for (int64_t r = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / kWarpSize; r < rows;
       r += warps) {
    const scalar_t* p = pred + r * D;
    const scalar_t* t = target + (broadcast ? r % B : r) * D;
    acc_t sum = 0;
    for (int64_t d = lane; d < D; d += kWarpSize) {
      const acc_t diff = static_cast<acc_t>(p[d]) - static_cast<acc_t>(t[d]);
      sum += diff * diff;
    }
    sum = warp_sum(sum);
    if (lane == 0) per_example[r] = sum * inv_d;
  }
}

// One block per member m (grid-stride), threads over b:
// per_member[m] = sum_b mask * per_example / sum_b mask, 0 for an all-zero mask row.
template <typename scalar_t, typename acc_t>
__global__ void member_mean_kernel(const acc_t* __restrict__ per_example,
                                   const scalar_t* __restrict__ mask, int64_t M, int64_t B,
                                   acc_t* __restrict__ per_member) {
  __shared__ acc_t buffer[kWarpSize];
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    acc_t num = 0, total = 0;
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
      const acc_t w = static_cast<acc_t>(mask[m * B + b]);
      num += w * per_example[m * B + b];
      total += w;
    }
    num = block_sum(num, buffer);
    total = block_sum(total, buffer);
    if (threadIdx.x == 0) per_member[m] = total != 0 ? num / total : acc_t(0);
  }
}

// One block per member m (grid-stride), threads over b: the backward coefficient of row
// (m, b), coef = 2/D (grad_per_example + grad_per_member[m] mask / sum_b mask).
template <typename scalar_t, typename acc_t>
__global__ void row_coefficients_kernel(const acc_t* __restrict__ grad_example,
                                        const acc_t* __restrict__ grad_member,
                                        const scalar_t* __restrict__ mask, int64_t M,
                                        int64_t B, acc_t two_over_d, acc_t* __restrict__ coef) {
  __shared__ acc_t buffer[kWarpSize];
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    acc_t total = 0;
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x)
      total += static_cast<acc_t>(mask[m * B + b]);
    total = block_sum(total, buffer);
    const acc_t per_weight = total != 0 ? grad_member[m] / total : acc_t(0);
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
      const int64_t r = m * B + b;
      coef[r] = two_over_d * (grad_example[r] + per_weight * static_cast<acc_t>(mask[r]));
    }
  }
}

// One thread per element i of pred (grid-stride); a [B,D] target repeats every B*D elements.
template <typename scalar_t, typename acc_t>
__global__ void grad_pred_kernel(const acc_t* __restrict__ coef, const scalar_t* __restrict__ pred,
                                 const scalar_t* __restrict__ target, int64_t numel, int64_t D,
                                 int64_t target_numel, scalar_t* __restrict__ grad_pred) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t ti = target_numel == numel ? i : i % target_numel;
    const acc_t diff = static_cast<acc_t>(pred[i]) - static_cast<acc_t>(target[ti]);
    grad_pred[i] = static_cast<scalar_t>(coef[i / D] * diff);
  }
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& pred_,
                                                const at::Tensor& target_,
                                                const at::Tensor& mask_) {
  const auto s = check_masked_member_mse("masked_member_mse", pred_, target_, mask_);
  c10::cuda::CUDAGuard guard(pred_.device());
  const auto pred = pred_.contiguous(), target = target_.contiguous(), mask = mask_.contiguous();
  const auto acc_options = pred.options().dtype(accumulate_type(pred.scalar_type()));
  auto per_example = at::empty({s.members, s.batch}, acc_options);
  auto per_member = at::empty({s.members}, acc_options);
  const int64_t rows = s.members * s.batch;
  if (s.members == 0) return {per_example, per_member};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "masked_member_mse_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    if (rows > 0) {
      const acc_t inv_d = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(s.dim, 1));
      squared_error_rows_kernel<<<blocks_for(rows * kWarpSize), kThreads, 0, stream>>>(
          pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), rows, s.batch,
          s.dim, s.broadcast_target, inv_d, per_example.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    member_mean_kernel<<<blocks_for(s.members, 1), kThreads, 0, stream>>>(
        per_example.const_data_ptr<acc_t>(), mask.const_data_ptr<scalar_t>(), s.members,
        s.batch, per_member.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {per_example, per_member};
}

at::Tensor backward_cuda(const at::Tensor& grad_example_, const at::Tensor& grad_member_,
                         const at::Tensor& pred_, const at::Tensor& target_,
                         const at::Tensor& mask_) {
  constexpr const char* op = "masked_member_mse_backward";
  const auto s = check_masked_member_mse(op, pred_, target_, mask_);
  check_masked_member_mse_grads(op, s, grad_example_, grad_member_, pred_);
  c10::cuda::CUDAGuard guard(pred_.device());
  const auto pred = pred_.contiguous(), target = target_.contiguous(), mask = mask_.contiguous();
  const auto grad_example = grad_example_.contiguous(), grad_member = grad_member_.contiguous();
  auto grad_pred = at::empty(pred.sizes(), pred.options());
  const int64_t numel = pred.numel();
  if (numel == 0) return grad_pred;
  auto coef = at::empty({s.members, s.batch}, grad_example.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "masked_member_mse_backward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t two_over_d = acc_t(2) / static_cast<acc_t>(s.dim);
    row_coefficients_kernel<<<blocks_for(s.members, 1), kThreads, 0, stream>>>(
        grad_example.const_data_ptr<acc_t>(), grad_member.const_data_ptr<acc_t>(),
        mask.const_data_ptr<scalar_t>(), s.members, s.batch, two_over_d,
        coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_pred_kernel<<<blocks_for(numel), kThreads, 0, stream>>>(
        coef.const_data_ptr<acc_t>(), pred.const_data_ptr<scalar_t>(),
        target.const_data_ptr<scalar_t>(), numel, s.dim, target.numel(),
        grad_pred.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_pred;
}

}  // namespace

TORCH_LIBRARY_IMPL(ensattr_fast, CUDA, m) {
  m.impl("masked_member_mse", &forward_cuda);
  m.impl("masked_member_mse_backward", &backward_cuda);
}

}  // namespace ensattr_fast
