// CUDA kernels of the code_scores family: centre the statistics in double (as the CPU
// kernels do: the scores are invariant to a common shift, which would only cost float
// precision), score 32 units per block against shared-memory tiles of the statistics,
// then merge the running top-k, one block per row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../checks.h"
#include "utils.cuh"

namespace ensattr_fast {
namespace {

constexpr int kTile = 32;                         // units, members and tile edge per block
constexpr int kTileRows = 8;                      // warps per scoring block
constexpr int kPerWarp = kTile / kTileRows;       // units (or queries) per warp
constexpr int kTopkMax = 64;                      // candidates a top-k thread keeps
constexpr int kTopkThreads = 128;

// Row means, column means and total mean of G_s into means [S, 2M+1], in double.
// One block per sample s (grid-stride): thread per column j walking down it (coalesced
// across threads), warp per row i with lanes along it.
template <typename scalar_t>
__global__ void gram_means_kernel(const scalar_t* __restrict__ gram, int64_t S, int64_t M,
                                  double* __restrict__ means) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ double buffer[kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const scalar_t* g = gram + s * M * M;
    double* mu = means + s * (2 * M + 1);
    double total = 0;
    for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
      double col = 0;
      for (int64_t i = 0; i < M; ++i) col += static_cast<acc_t>(g[i * M + j]);
      mu[M + j] = col / M;
      total += col;
    }
    for (int64_t i = warp; i < M; i += warps) {
      double row = 0;
      for (int64_t j = lane; j < M; j += kWarpSize) row += static_cast<acc_t>(g[i * M + j]);
      row = warp_sum(row);
      if (lane == 0) mu[i] = row / M;
    }
    total = block_sum(total, buffer);
    if (threadIdx.x == 0) mu[2 * M] = total / (M * M);
  }
}

// One thread per element (s, i, j) of G' = P G P (grid-stride).
template <typename scalar_t, typename acc_t>
__global__ void centre_gram_kernel(const scalar_t* __restrict__ gram,
                                   const double* __restrict__ means, int64_t S, int64_t M,
                                   acc_t* __restrict__ centred) {
  const int64_t MM = M * M, total = S * MM, stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t s = e / MM, i = (e - s * MM) / M, j = e - s * MM - i * M;
    const double* mu = means + s * (2 * M + 1);
    const double g = static_cast<acc_t>(gram[e]);
    centred[e] = static_cast<acc_t>(g - mu[i] - mu[M + j] + mu[2 * M]);
  }
}

// One warp per query q (grid-stride), lanes over members: L' = L - mean_m L (in double).
template <typename scalar_t, typename acc_t>
__global__ void centre_losses_kernel(const scalar_t* __restrict__ losses, int64_t Q, int64_t M,
                                     acc_t* __restrict__ centred) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / kWarpSize);
  for (int64_t q = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / kWarpSize; q < Q;
       q += warps) {
    double sum = 0;
    for (int64_t m = lane; m < M; m += kWarpSize) sum += static_cast<acc_t>(losses[q * M + m]);
    const double mean = warp_sum(sum) / M;
    for (int64_t m = lane; m < M; m += kWarpSize) {
      const double l = static_cast<acc_t>(losses[q * M + m]);
      centred[q * M + m] = static_cast<acc_t>(l - mean);
    }
  }
}

// scores[s,u] = sqrt(max(e^T G'_s e, 0)) / |E|, e the excluder indicator of unit u.
// Block of 32 x 8 threads: 32 units u0 + ty + 8r (warp ty holds r < 4), looping over
// samples s (grid-stride in y). G'_s goes by in 32 x 32 tiles staged in shared memory,
// lane tx on column j0 + tx, so that each tile load serves 32 units; a unit's excluder
// bits over the tile's rows i0..i0+31 come from one warp ballot.
template <typename acc_t>
__global__ void first_order_kernel(const uint8_t* __restrict__ code,
                                   const acc_t* __restrict__ centred, int64_t S, int64_t N,
                                   int64_t M, acc_t* __restrict__ scores) {
  __shared__ acc_t tile[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  int64_t unit[kPerWarp];
  for (int r = 0; r < kPerWarp; ++r) unit[r] = int64_t{blockIdx.x} * kTile + ty + kTileRows * r;
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const acc_t* g = centred + s * M * M;
    acc_t quad[kPerWarp] = {};
    int count[kPerWarp] = {};
    for (int64_t i0 = 0; i0 < M; i0 += kTile) {
      unsigned rows_ex[kPerWarp];
      for (int r = 0; r < kPerWarp; ++r) {
        const bool ex = unit[r] < N && i0 + tx < M && code[unit[r] * M + i0 + tx] == 0;
        rows_ex[r] = __ballot_sync(kFullMask, ex);
        count[r] += __popc(rows_ex[r]);
      }
      for (int64_t j0 = 0; j0 < M; j0 += kTile) {
        const int64_t j = j0 + tx;
        __syncthreads();
        for (int ii = ty; ii < kTile; ii += kTileRows)
          tile[ii][tx] = i0 + ii < M && j < M ? g[(i0 + ii) * M + j] : acc_t(0);
        __syncthreads();
        acc_t partial[kPerWarp] = {};
#pragma unroll 8
        for (int ii = 0; ii < kTile; ++ii) {
          const acc_t v = tile[ii][tx];
          for (int r = 0; r < kPerWarp; ++r) partial[r] += (rows_ex[r] >> ii) & 1u ? v : acc_t(0);
        }
        for (int r = 0; r < kPerWarp; ++r) {
          const bool ex = unit[r] < N && j < M && code[unit[r] * M + j] == 0;
          quad[r] += partial[r] * static_cast<acc_t>(ex);  // as the CPU: 0 * inf is NaN
        }
      }
    }
    for (int r = 0; r < kPerWarp; ++r) {
      const acc_t q = warp_sum(quad[r]);
      if (tx == 0 && unit[r] < N) {
        scores[s * N + unit[r]] = count[r] == 0   ? std::numeric_limits<acc_t>::quiet_NaN()
                                  : count[r] == M ? acc_t(0)  // ablating it changes nothing
                                                  : std::sqrt(q < 0 ? acc_t(0) : q) / count[r];
      }
    }
  }
}

// scores[q,u] = (sum_{m in E} L'[q,m]) (1/|E| + 1/(M-|E|)). Block of 32 x 8 threads:
// lane tx on unit u0 + tx, warp ty on queries q0 + ty + 8r (r < 4), looping over query
// tiles (grid-stride in y). Members go by in tiles of 32 staged in shared memory: excluder
// indicators [member][unit] and centred losses [query][member] (a broadcast per warp).
template <typename acc_t>
__global__ void loss_contrast_kernel(const uint8_t* __restrict__ code,
                                     const acc_t* __restrict__ centred, int64_t Q, int64_t N,
                                     int64_t M, acc_t* __restrict__ scores) {
  __shared__ acc_t excluded[kTile][kTile + 1];
  __shared__ acc_t loss[kTile][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t u0 = int64_t{blockIdx.x} * kTile, u = u0 + tx;
  for (int64_t q0 = int64_t{blockIdx.y} * kTile; q0 < Q; q0 += int64_t{gridDim.y} * kTile) {
    acc_t sum[kPerWarp] = {};
    int count = 0;
    for (int64_t m0 = 0; m0 < M; m0 += kTile) {
      const int64_t m = m0 + tx;
      __syncthreads();
      for (int rr = ty; rr < kTile; rr += kTileRows) {
        const int64_t unit = u0 + rr, q = q0 + rr;
        excluded[tx][rr] = unit < N && m < M && code[unit * M + m] == 0 ? acc_t(1) : acc_t(0);
        loss[rr][tx] = q < Q && m < M ? centred[q * M + m] : acc_t(0);
      }
      __syncthreads();
      for (int mm = 0; mm < kTile; ++mm) {
        const acc_t e = excluded[mm][tx];
        count += e != acc_t(0);
        for (int r = 0; r < kPerWarp; ++r) sum[r] += e * loss[ty + kTileRows * r][mm];
      }
    }
    const bool valid = count > 0 && count < M;
    const acc_t scale = valid ? acc_t(1) / count + acc_t(1) / (M - count) : acc_t(0);
    for (int r = 0; r < kPerWarp; ++r) {
      const int64_t q = q0 + ty + kTileRows * r;
      if (q < Q && u < N)
        scores[q * N + u] = valid ? sum[r] * scale : std::numeric_limits<acc_t>::quiet_NaN();
    }
  }
}

// Larger value first; on equal values the lower unit index. Index < 0 means "no candidate".
template <typename acc_t>
__device__ __forceinline__ bool better(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  return va > vb || (va == vb && ia < ib);
}

// The best of two (value, index, owning thread); owners break exact ties so that all
// threads agree on one winner.
template <typename acc_t>
__device__ __forceinline__ void take_better(acc_t& v, int64_t& i, int& o, acc_t ov, int64_t oi,
                                            int oo) {
  if (better(ov, oi, v, i) || (!better(v, i, ov, oi) && oo < o)) {
    v = ov;
    i = oi;
    o = oo;
  }
}

// One block per row (grid-stride). Each thread keeps a sorted list of its best <= k
// candidates (previous top-k and this chunk's scores, strided over threads); then k rounds
// of a block-wide argmax over the list heads pop the winners in order.
template <typename acc_t>
__global__ void merge_topk_kernel(const acc_t* __restrict__ scores, int64_t R, int64_t N, int k,
                                  int64_t unit_offset, const acc_t* __restrict__ prev_values,
                                  const int64_t* __restrict__ prev_indices,
                                  acc_t* __restrict__ top_values,
                                  int64_t* __restrict__ top_indices) {
  constexpr int kWarps = kTopkThreads / kWarpSize;
  __shared__ acc_t warp_value[kWarps];
  __shared__ int64_t warp_index[kWarps];
  __shared__ int warp_owner[kWarps];
  acc_t values[kTopkMax];
  int64_t indices[kTopkMax];
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  for (int64_t row = blockIdx.x; row < R; row += gridDim.x) {
    int count = 0;
    const auto offer = [&](acc_t v, int64_t index) {
      if (v != v || index < 0) return;  // NaN and empty slots never enter
      if (count == k && !better(v, index, values[k - 1], indices[k - 1])) return;
      int pos = count < k ? count++ : k - 1;
      for (; pos > 0 && better(v, index, values[pos - 1], indices[pos - 1]); --pos) {
        values[pos] = values[pos - 1];
        indices[pos] = indices[pos - 1];
      }
      values[pos] = v;
      indices[pos] = index;
    };
    if (prev_values != nullptr) {
      for (int64_t j = tid; j < k; j += blockDim.x)
        offer(prev_values[row * k + j], prev_indices[row * k + j]);
    }
    for (int64_t n = tid; n < N; n += blockDim.x) offer(scores[row * N + n], unit_offset + n);
    int head = 0;
    for (int r = 0; r < k; ++r) {
      acc_t v = head < count ? values[head] : acc_t(0);
      int64_t i = head < count ? indices[head] : -1;
      int o = tid;
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        take_better(v, i, o, __shfl_xor_sync(kFullMask, v, offset),
                    __shfl_xor_sync(kFullMask, i, offset), __shfl_xor_sync(kFullMask, o, offset));
      }
      __syncthreads();  // every thread has read the previous round's warp winners
      if (lane == 0) {
        warp_value[warp] = v;
        warp_index[warp] = i;
        warp_owner[warp] = o;
      }
      __syncthreads();
      v = warp_value[0];
      i = warp_index[0];
      o = warp_owner[0];
      for (int w = 1; w < kWarps; ++w)
        take_better(v, i, o, warp_value[w], warp_index[w], warp_owner[w]);
      if (tid == o) ++head;
      if (tid == 0) {
        top_values[row * k + r] = i >= 0 ? v : -std::numeric_limits<acc_t>::infinity();
        top_indices[row * k + r] = i;
      }
    }
  }
}

template <typename scalar_t>
void score_units(bool first_order, const at::Tensor& code, const at::Tensor& stats,
                 const ScoreShape& shape, at::Tensor& scores, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t S = shape.rows, N = shape.units, M = shape.members;
  auto centred = at::empty(stats.sizes(), scores.options());
  const scalar_t* raw = stats.const_data_ptr<scalar_t>();
  acc_t* c = centred.mutable_data_ptr<acc_t>();
  if (first_order && M > 0) {
    auto means = at::empty({S, 2 * M + 1}, scores.options().dtype(at::kDouble));
    gram_means_kernel<<<blocks_for(S, 1), kThreads, 0, stream>>>(
        raw, S, M, means.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    centre_gram_kernel<<<blocks_for(S * M * M), kThreads, 0, stream>>>(
        raw, means.const_data_ptr<double>(), S, M, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (M > 0) {
    centre_losses_kernel<<<blocks_for(S * kWarpSize), kThreads, 0, stream>>>(raw, S, M, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const dim3 block(kTile, kTileRows);
  const unsigned unit_blocks = static_cast<unsigned>((N + kTile - 1) / kTile);
  if (first_order) {
    first_order_kernel<<<dim3(unit_blocks, grid_y_for(S)), block, 0, stream>>>(
        code.const_data_ptr<uint8_t>(), centred.const_data_ptr<acc_t>(), S, N, M,
        scores.mutable_data_ptr<acc_t>());
  } else {
    loss_contrast_kernel<<<dim3(unit_blocks, grid_y_for((S + kTile - 1) / kTile)), block, 0,
                           stream>>>(code.const_data_ptr<uint8_t>(),
                                     centred.const_data_ptr<acc_t>(), S, N, M,
                                     scores.mutable_data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kFirstOrder>
std::tuple<at::Tensor, at::Tensor, at::Tensor> code_scores_cuda(
    const at::Tensor& code_, const at::Tensor& stats_, int64_t k, int64_t unit_offset,
    const std::optional<at::Tensor>& prev_values, const std::optional<at::Tensor>& prev_indices) {
  const char* op = kFirstOrder ? "code_first_order" : "code_loss_contrast";
  const auto shape = check_code_scores(op, kFirstOrder ? "gram" : "losses", code_, stats_,
                                       kFirstOrder ? 3 : 2, k, prev_values, prev_indices);
  TORCH_CHECK(k <= kTopkMax, op, ": k must be <= ", kTopkMax,
              " on CUDA (the per-thread candidate list of the top-k kernel), got k = ", k);
  c10::cuda::CUDAGuard guard(code_.device());
  const auto code = code_.contiguous(), stats = stats_.contiguous();
  const auto acc_options = stats.options().dtype(accumulate_type(stats.scalar_type()));
  const int64_t S = shape.rows, N = shape.units;
  auto scores = at::empty({S, N}, acc_options);
  auto top_values = at::empty({S, k}, acc_options);
  auto top_indices = at::empty({S, k}, acc_options.dtype(at::kLong));
  if (S == 0) return {scores, top_values, top_indices};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, stats.scalar_type(), "code_scores_cuda",
                                  [&] {
    using acc_t = opmath_t<scalar_t>;
    if (N > 0) score_units<scalar_t>(kFirstOrder, code, stats, shape, scores, stream);
    if (k > 0) {
      const auto pv = prev_values ? prev_values->contiguous() : at::Tensor();
      const auto pi = prev_indices ? prev_indices->contiguous() : at::Tensor();
      merge_topk_kernel<<<blocks_for(S, 1), kTopkThreads, 0, stream>>>(
          scores.const_data_ptr<acc_t>(), S, N, static_cast<int>(k), unit_offset,
          pv.defined() ? pv.const_data_ptr<acc_t>() : nullptr,
          pi.defined() ? pi.const_data_ptr<int64_t>() : nullptr,
          top_values.mutable_data_ptr<acc_t>(), top_indices.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {scores, top_values, top_indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(ensattr_fast, CUDA, m) {
  m.impl("code_first_order", &code_scores_cuda<true>);
  m.impl("code_loss_contrast", &code_scores_cuda<false>);
}

}  // namespace ensattr_fast
