// Running top-k per row on CUDA, for k <= kSelectTopkMax (32; larger k: topk_by_sort.h). A warp
// per row (grid-stride over rows): lane l holds the row's l-th best entry so far (WarpTopk), and
// the 32 lanes read the row's candidates 32 consecutive ones at a time (4 x 32 loads in flight),
// offering them together; a candidate that beats the k-th best is inserted by one ballot and one
// shift. Rows longer than kTopkSlice scores go in two passes: a warp per (row, slice of kTopkSlice
// scores) keeps the slice's best k, then a warp per row merges the previous top-k with the slices'
// lists. Same answer as the CPU (cpu/topk.h): larger score first, ties to the lower unit, NaN and
// index -1 never selected, -inf / -1 padding.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>

#include "utils.cuh"

namespace ensattr_fast {

constexpr int64_t kTopkSlice = 2048;  // candidates per warp in the first top-k pass

// Larger value first; on equal values the lower unit index. Index < 0 means "no candidate".
template <typename acc_t>
__device__ __forceinline__ bool better(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  return va > vb || (va == vb && ia < ib);
}

// The best k <= 32 candidates offered to a warp, sorted: lane l holds the l-th best (index -1:
// none yet). All lanes call offer() together, each with its own candidate; a candidate that
// beats the k-th best is inserted (one ballot, one shift), the others cost one ballot.
template <typename acc_t>
struct WarpTopk {
  acc_t value = acc_t(0);
  int64_t index = -1;

  // This lane's candidate (v, i) into the best k (1 <= k <= 32); all 32 lanes must call it.
  __device__ void offer(acc_t v, int64_t i, int k) {
    const int lane = threadIdx.x % kWarpSize;
    const bool valid = i >= 0 && v == v;  // NaN and empty slots never enter
    acc_t worst_v = __shfl_sync(kFullMask, value, k - 1);
    int64_t worst_i = __shfl_sync(kFullMask, index, k - 1);
    unsigned pending = __ballot_sync(kFullMask, valid && better(v, i, worst_v, worst_i));
    while (pending != 0) {
      const int src = __ffs(pending) - 1;
      const acc_t cv = __shfl_sync(kFullMask, v, src);
      const int64_t ci = __shfl_sync(kFullMask, i, src);
      // the lanes holding better entries form a prefix of length pos (< k: cv beats lane k-1)
      const int pos = __popc(__ballot_sync(kFullMask, better(value, index, cv, ci)));
      const acc_t above_v = __shfl_up_sync(kFullMask, value, 1);
      const int64_t above_i = __shfl_up_sync(kFullMask, index, 1);
      if (lane == pos) {
        value = cv;
        index = ci;
      } else if (lane > pos) {
        value = above_v;
        index = above_i;
      }
      worst_v = __shfl_sync(kFullMask, value, k - 1);
      worst_i = __shfl_sync(kFullMask, index, k - 1);
      pending &= pending - 1;  // src is done
      pending &= __ballot_sync(kFullMask, valid && better(v, i, worst_v, worst_i));
    }
  }
};

// Offers values[n] with unit indices[n] (or first_index + n when indices is null), n < count,
// to a warp's top-k, 4 x 32 loads in flight.
template <typename acc_t>
__device__ void offer_range(WarpTopk<acc_t>& top, int k, const acc_t* __restrict__ values,
                            const int64_t* __restrict__ indices, int64_t first_index,
                            int64_t count) {
  constexpr int kDepth = 4;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t base = 0; base < count; base += kDepth * kWarpSize) {
    acc_t v[kDepth];
    int64_t i[kDepth];
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int64_t n = base + d * kWarpSize + lane;
      const bool in = n < count;
      v[d] = in ? values[n] : acc_t(0);
      i[d] = !in ? -1 : indices != nullptr ? indices[n] : first_index + n;
    }
#pragma unroll
    for (int d = 0; d < kDepth; ++d) top.offer(v[d], i[d], k);
  }
}

// First pass for long rows: warp per (row, slice of kTopkSlice scores), grid-stride; the
// slice's best k (sorted, index -1 for none) into out [R, slices, k].
template <typename acc_t>
__global__ void topk_slices_kernel(const acc_t* __restrict__ scores, int64_t R, int64_t N,
                                   int64_t slices, int k, int64_t unit_offset,
                                   acc_t* __restrict__ out_values,
                                   int64_t* __restrict__ out_indices) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / kWarpSize);
  for (int64_t w = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / kWarpSize; w < R * slices;
       w += warps) {
    const int64_t row = w / slices, first = (w - row * slices) * kTopkSlice;
    WarpTopk<acc_t> top;
    offer_range(top, k, scores + row * N + first, static_cast<const int64_t*>(nullptr),
                unit_offset + first, N - first < kTopkSlice ? N - first : kTopkSlice);
    if (lane < k) {
      out_values[w * k + lane] = top.value;
      out_indices[w * k + lane] = top.index;
    }
  }
}

// Warp per row (grid-stride): the previous top-k [R, k] and the row's candidates [R, count]
// (the scores, or the first pass's lists) merged into top [R, k]; empty slots get -inf, -1.
template <typename acc_t>
__global__ void topk_merge_kernel(const acc_t* __restrict__ prev_values,
                                  const int64_t* __restrict__ prev_indices,
                                  const acc_t* __restrict__ values,
                                  const int64_t* __restrict__ indices, int64_t first_index,
                                  int64_t count, int64_t R, int k, acc_t* __restrict__ top_values,
                                  int64_t* __restrict__ top_indices) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / kWarpSize);
  for (int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / kWarpSize; row < R;
       row += warps) {
    WarpTopk<acc_t> top;
    if (prev_values != nullptr)
      offer_range(top, k, prev_values + row * k, prev_indices + row * k, 0, k);
    offer_range(top, k, values + row * count, indices != nullptr ? indices + row * count : nullptr,
                first_index, count);
    if (lane < k) {
      top_values[row * k + lane] =
          top.index >= 0 ? top.value : -std::numeric_limits<acc_t>::infinity();
      top_indices[row * k + lane] = top.index;
    }
  }
}

// top_values/top_indices [R,k] := top-k of (pv/pi [R,k], undefined for none; scores [R,N] of
// units unit_offset + n), all contiguous on the current device, launched on `stream`.
// k <= kSelectTopkMax: rows of up to kTopkSlice scores in one pass, longer rows in two.
template <typename acc_t>
void merge_topk_cuda(const at::Tensor& scores, int k, int64_t unit_offset, const at::Tensor& pv,
                     const at::Tensor& pi, at::Tensor& top_values, at::Tensor& top_indices,
                     cudaStream_t stream) {
  const int64_t R = scores.size(0), N = scores.size(1);
  const int64_t slices = (N + kTopkSlice - 1) / kTopkSlice;
  const acc_t* values = scores.const_data_ptr<acc_t>();
  const int64_t* indices = nullptr;
  int64_t first_index = unit_offset, count = N;
  at::Tensor slice_values, slice_indices;
  if (slices > 1) {
    slice_values = at::empty({R, slices, k}, scores.options());
    slice_indices = at::empty({R, slices, k}, scores.options().dtype(at::kLong));
    topk_slices_kernel<<<blocks_for(R * slices * kWarpSize), kThreads, 0, stream>>>(
        values, R, N, slices, k, unit_offset, slice_values.mutable_data_ptr<acc_t>(),
        slice_indices.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    values = slice_values.const_data_ptr<acc_t>();
    indices = slice_indices.const_data_ptr<int64_t>();
    first_index = 0;
    count = slices * k;
  }
  topk_merge_kernel<<<blocks_for(R * kWarpSize), kThreads, 0, stream>>>(
      pv.defined() ? pv.const_data_ptr<acc_t>() : nullptr,
      pi.defined() ? pi.const_data_ptr<int64_t>() : nullptr, values, indices, first_index, count, R,
      k, top_values.mutable_data_ptr<acc_t>(), top_indices.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ensattr_fast
