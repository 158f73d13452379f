// CUDA kernels of masked_member_mse. The work is two passes over rows (m, b) of length D:
// the forward reduces each row, the backward writes grad_pred row by row. Rows get a group of
// threads sized to D (a warp for short rows, up to the whole block for long ones), so that
// M = 16, B = 128 still fills the GPU; each thread moves 16 bytes per access where D and the
// pointers allow it. The per-member mean and the backward's row coefficients are O(M B).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "utils.cuh"

namespace ensattr_fast {
namespace {

// Threads per row (a multiple of 32 that divides kThreads): about 8 vectors per thread.
int threads_per_row(int64_t vectors_per_row) {
  int tpr = kWarpSize;
  while (tpr < kThreads && vectors_per_row > int64_t{tpr} * 8) tpr *= 2;
  return tpr;
}

// Block of kThreads: kThreads / tpr rows at a time (grid-stride), tpr threads per row r, thread
// i of the row on vectors i, i + tpr, ... (a warp reads 32 consecutive vectors):
// per_example[r] = sum_d (pred[r,d] - target[r or r % B, d])^2 / max(D, 1).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    squared_error_rows_kernel(const scalar_t* __restrict__ pred,
                              const scalar_t* __restrict__ target, int64_t rows, int64_t B,
                              int64_t D, bool broadcast, acc_t inv_d, int tpr,
                              acc_t* __restrict__ per_example) {
  __shared__ acc_t partial[kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int per_block = blockDim.x / tpr, slot = threadIdx.x / tpr, in_row = threadIdx.x % tpr;
  const int warps_per_row = tpr / kWarpSize;
  const int64_t vectors = D / V;
  for (int64_t first = int64_t{blockIdx.x} * per_block; first < rows;
       first += int64_t{gridDim.x} * per_block) {
    const int64_t r = first + slot;
    acc_t sum = 0;
    if (r < rows) {
      const scalar_t* p = pred + r * D;
      const scalar_t* t = target + (broadcast ? r % B : r) * D;
#pragma unroll 4
      for (int64_t v = in_row; v < vectors; v += tpr) {
        const auto a = load_vec<V>(p + v * V), b = load_vec<V>(t + v * V);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const acc_t diff = static_cast<acc_t>(a.v[e]) - static_cast<acc_t>(b.v[e]);
          sum += diff * diff;
        }
      }
    }
    sum = warp_sum(sum);
    if (warps_per_row == 1) {
      if (lane == 0 && r < rows) per_example[r] = sum * inv_d;
    } else {  // uniform over the block: tpr is a kernel argument
      // the previous rows' partials have been read
      __syncthreads();
      if (lane == 0) partial[warp] = sum;
      __syncthreads();
      if (in_row == 0 && r < rows) {
        acc_t total = 0;
        for (int w = 0; w < warps_per_row; ++w) total += partial[slot * warps_per_row + w];
        per_example[r] = total * inv_d;
      }
    }
  }
}

// One block per member m (grid-stride), threads over b:
// per_member[m] = sum_b mask * per_example / sum_b mask, 0 for an all-zero mask row.
template <typename acc_t>
__global__ void member_mean_kernel(const acc_t* __restrict__ per_example,
                                   const acc_t* __restrict__ mask, int64_t M, int64_t B,
                                   acc_t* __restrict__ per_member) {
  __shared__ acc_t buffer[kWarpSize];
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    acc_t num = 0, total = 0;
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
      const acc_t w = mask[m * B + b];
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
template <typename acc_t>
__global__ void row_coefficients_kernel(const acc_t* __restrict__ grad_example,
                                        const acc_t* __restrict__ grad_member,
                                        const acc_t* __restrict__ mask, int64_t M, int64_t B,
                                        acc_t two_over_d, acc_t* __restrict__ coef) {
  __shared__ acc_t buffer[kWarpSize];
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    acc_t total = 0;
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) total += mask[m * B + b];
    total = block_sum(total, buffer);
    const acc_t per_weight = total != 0 ? grad_member[m] / total : acc_t(0);
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
      const int64_t r = m * B + b;
      coef[r] = two_over_d * (grad_example[r] + per_weight * mask[r]);
    }
  }
}

// Rows as in squared_error_rows_kernel:
// grad_pred[r, :] = coef[r] (pred[r, :] - target[r or r % B, :]).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(const acc_t* __restrict__ coef, const scalar_t* __restrict__ pred,
                     const scalar_t* __restrict__ target, int64_t rows, int64_t B, int64_t D,
                     bool broadcast, int tpr, scalar_t* __restrict__ grad_pred) {
  const int per_block = blockDim.x / tpr, slot = threadIdx.x / tpr, in_row = threadIdx.x % tpr;
  const int64_t vectors = D / V;
  for (int64_t r = int64_t{blockIdx.x} * per_block + slot; r < rows;
       r += int64_t{gridDim.x} * per_block) {
    const scalar_t* p = pred + r * D;
    const scalar_t* t = target + (broadcast ? r % B : r) * D;
    scalar_t* g = grad_pred + r * D;
    const acc_t c = coef[r];
#pragma unroll 4
    for (int64_t v = in_row; v < vectors; v += tpr) {
      const auto a = load_vec<V>(p + v * V), b = load_vec<V>(t + v * V);
      Vec<scalar_t, V> out;
#pragma unroll
      for (int e = 0; e < V; ++e)
        out.v[e] =
            static_cast<scalar_t>(c * (static_cast<acc_t>(a.v[e]) - static_cast<acc_t>(b.v[e])));
      store_vec<V>(g + v * V, out);
    }
  }
}

// Calls launch(std::integral_constant<int, V>{}) with V = 16 bytes of scalar_t when every row
// starts on a 16-byte boundary, else with V = 1.
template <typename scalar_t, typename Launch>
void with_vector_width(int64_t D, std::initializer_list<const void*> pointers, Launch&& launch) {
  constexpr int V = kVec16<scalar_t>;
  if (D % V == 0 && aligned16(pointers)) {
    launch(std::integral_constant<int, V>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& pred_, const at::Tensor& target_,
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
      const scalar_t* p = pred.const_data_ptr<scalar_t>();
      const scalar_t* t = target.const_data_ptr<scalar_t>();
      with_vector_width<scalar_t>(s.dim, {p, t}, [&](auto width) {
        constexpr int V = decltype(width)::value;
        const int tpr = threads_per_row(s.dim / V);
        squared_error_rows_kernel<scalar_t, acc_t, V>
            <<<blocks_for(rows, kThreads / tpr), kThreads, 0, stream>>>(
                p, t, rows, s.batch, s.dim, s.broadcast_target, inv_d, tpr,
                per_example.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    member_mean_kernel<<<blocks_for(s.members, 1), kThreads, 0, stream>>>(
        per_example.const_data_ptr<acc_t>(), mask.const_data_ptr<acc_t>(), s.members, s.batch,
        per_member.mutable_data_ptr<acc_t>());
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
  if (pred.numel() == 0) return grad_pred;
  const int64_t rows = s.members * s.batch;
  auto coef = at::empty({s.members, s.batch}, grad_example.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "masked_member_mse_backward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t two_over_d = acc_t(2) / static_cast<acc_t>(s.dim);
    row_coefficients_kernel<<<blocks_for(s.members, 1), kThreads, 0, stream>>>(
        grad_example.const_data_ptr<acc_t>(), grad_member.const_data_ptr<acc_t>(),
        mask.const_data_ptr<acc_t>(), s.members, s.batch, two_over_d,
        coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    scalar_t* g = grad_pred.mutable_data_ptr<scalar_t>();
    with_vector_width<scalar_t>(s.dim, {p, t, g}, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int tpr = threads_per_row(s.dim / V);
      grad_rows_kernel<scalar_t, acc_t, V>
          <<<blocks_for(rows, kThreads / tpr), kThreads, 0, stream>>>(
              coef.const_data_ptr<acc_t>(), p, t, rows, s.batch, s.dim, s.broadcast_target, tpr, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_pred;
}

}  // namespace

TORCH_LIBRARY_IMPL(ensattr_fast, CUDA, m) {
  m.impl("masked_member_mse", &forward_cuda);
  m.impl("masked_member_mse_backward", &backward_cuda);
}

}  // namespace ensattr_fast
