// CUDA kernels of the code_scores family. The statistics are centred first, in double (as the
// CPU kernels do: the scores are invariant to a common shift, which would only cost float
// precision). First order: for M up to ~50 members, a block builds a sample's nibble-pair
// tables (csrc/cpu/code_scores.cpp explains them) in shared memory and each thread scores
// units with one table read per pair of nibbles; larger M goes through 32 x 32 tiles of G'.
// Loss contrast: tiles of the centred losses. A row of statistics holding an infinite or NaN
// value cannot be centred (inf - inf) and is scored term by term from the raw values, as the
// reference and the CPU kernels do. The running top-k: a warp-wide selection for k <= 32
// (topk.cuh), two stable sorts beyond (topk_by_sort.h).
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
#include "../topk_by_sort.h"
#include "topk.cuh"
#include "utils.cuh"

namespace ensattr_fast {
namespace {

constexpr int kTile = 32;                               // units, members and tile edge per block
constexpr int kTileRows = 8;                            // warps per tiled block
constexpr int kPerWarp = kTile / kTileRows;             // units (or queries) per warp
constexpr int64_t kTableBytesMax = 100 * 1024;          // two table blocks per multiprocessor
constexpr int64_t kUnitsPerTableBlock = 16 * kThreads;  // amortises building the tables

template <typename scalar_t>
__device__ __forceinline__ double as_double(scalar_t v) {
  return static_cast<double>(static_cast<opmath_t<scalar_t>>(v));
}

// ------------------------------------------------------------------------------ centring

// Row means, column means and total mean of G_s into means [S, 2M+1], in double (the total is
// non-finite iff G_s holds a non-finite value, or overflows). One block per sample s
// (grid-stride): thread per column j walking down it, warp per row i with lanes along it.
template <typename scalar_t>
__global__ void gram_means_kernel(const scalar_t* __restrict__ gram, int64_t S, int64_t M,
                                  double* __restrict__ means) {
  __shared__ double buffer[kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const scalar_t* g = gram + s * M * M;
    double* mu = means + s * (2 * M + 1);
    double total = 0;
    for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
      double col = 0;
      for (int64_t i = 0; i < M; ++i) col += as_double(g[i * M + j]);
      mu[M + j] = col / M;
      total += col;
    }
    for (int64_t i = warp; i < M; i += warps) {
      double row = 0;
      for (int64_t j = lane; j < M; j += kWarpSize) row += as_double(g[i * M + j]);
      row = warp_sum(row);
      if (lane == 0) mu[i] = row / M;
    }
    total = block_sum(total, buffer);
    if (threadIdx.x == 0) mu[2 * M] = total / (M * M);
  }
}

// One thread per element (s, i, j) of G' = P G P (grid-stride), stored as out_t.
template <typename scalar_t, typename out_t>
__global__ void centre_gram_kernel(const scalar_t* __restrict__ gram,
                                   const double* __restrict__ means, int64_t S, int64_t M,
                                   out_t* __restrict__ centred) {
  const int64_t MM = M * M, total = S * MM, stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t s = e / MM, i = (e - s * MM) / M, j = e - s * MM - i * M;
    const double* mu = means + s * (2 * M + 1);
    centred[e] = static_cast<out_t>(as_double(gram[e]) - mu[i] - mu[M + j] + mu[2 * M]);
  }
}

// One warp per query q (grid-stride), lanes over members: L' = L - mean_m L (in double), and
// the mean itself (non-finite iff the row holds a non-finite loss, or overflows).
template <typename scalar_t, typename acc_t>
__global__ void centre_losses_kernel(const scalar_t* __restrict__ losses, int64_t Q, int64_t M,
                                     acc_t* __restrict__ centred, double* __restrict__ row_mean) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / kWarpSize);
  for (int64_t q = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / kWarpSize; q < Q;
       q += warps) {
    double sum = 0;
    for (int64_t m = lane; m < M; m += kWarpSize) sum += as_double(losses[q * M + m]);
    const double mean = warp_sum(sum) / M;
    for (int64_t m = lane; m < M; m += kWarpSize)
      centred[q * M + m] = static_cast<acc_t>(as_double(losses[q * M + m]) - mean);
    if (lane == 0) row_mean[q] = mean;
  }
}

// ----------------------------------------------------------- rows that cannot be centred

// sqrt(max(v^T G v, 0)) with v = e/|E| - 1/M, term by term from the raw G_s (keeps NaN).
template <typename scalar_t>
__device__ double first_order_direct(const uint8_t* __restrict__ code_row,
                                     const scalar_t* __restrict__ g, int64_t M) {
  int64_t k = 0;
  for (int64_t m = 0; m < M; ++m) k += code_row[m] == 0;
  if (k == 0) return std::numeric_limits<double>::quiet_NaN();  // no ablation
  if (k == M) return 0;  // the ablated ensemble is the full one
  const double ex = 1.0 / k - 1.0 / M, in = -1.0 / M;
  double quad = 0;
  for (int64_t i = 0; i < M; ++i) {
    const double vi = code_row[i] == 0 ? ex : in;
    for (int64_t j = 0; j < M; ++j)
      quad += vi * (code_row[j] == 0 ? ex : in) * as_double(g[i * M + j]);
  }
  return sqrt(quad < 0 ? 0.0 : quad);
}

// mean over E of L_q minus mean over I, from the raw losses.
template <typename scalar_t>
__device__ double loss_direct(const uint8_t* __restrict__ code_row, const scalar_t* __restrict__ l,
                              int64_t M) {
  double sum_ex = 0, sum_in = 0;
  int64_t k = 0;
  for (int64_t m = 0; m < M; ++m) {
    const bool excluded = code_row[m] == 0;
    (excluded ? sum_ex : sum_in) += as_double(l[m]);
    k += excluded;
  }
  if (k == 0 || k == M) return std::numeric_limits<double>::quiet_NaN();
  return sum_ex / k - sum_in / (M - k);
}

// ------------------------------------------------------------------ first order: tables

// Bit m of masks[u]: member m excludes unit u (M <= 64); counts[u] = |E_u|. Thread per unit.
__global__ void exclusion_masks_kernel(const uint8_t* __restrict__ code, int64_t N, int64_t M,
                                       uint64_t* __restrict__ masks, int32_t* __restrict__ counts) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t u = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; u < N; u += stride) {
    uint64_t mask = 0;
    int32_t count = 0;
    for (int64_t m = 0; m < M; ++m) {
      const bool excluded = code[u * M + m] == 0;
      mask |= static_cast<uint64_t>(excluded) << m;
      count += excluded;
    }
    masks[u] = mask;
    counts[u] = count;
  }
}

__host__ __device__ constexpr int lowest_bit(int y) {
  return (y & 1) ? 0 : (y & 2) ? 1 : (y & 4) ? 2 : 3;
}

// tables[(pair, x, y)] = sum_{i in x, j in y} G'[4p + i, 4q + j] for nibble pairs p <= q (both
// orders counted when p < q), 256 entries per pair, from the centred G' in double. Thread per
// (pair, x): four column sums, then the 16 patterns y by adding one column at a time.
template <typename acc_t>
__device__ void build_pair_tables(const double* __restrict__ g, int M, int C, int pairs,
                                  acc_t* tables) {
  for (int task = threadIdx.x; task < pairs * 16; task += blockDim.x) {
    const int x = task % 16;
    int p = 0, rest = task / 16;
    while (rest >= C - p) rest -= C - p++;
    const int q = p + rest;
    double column[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gj = 4 * q + j;
      double sum = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int gi = 4 * p + i;
        if ((x >> i & 1) && gi < M && gj < M)
          sum += p == q ? g[gi * M + gj] : g[gi * M + gj] + g[gj * M + gi];
      }
      column[j] = sum;
    }
    double row[16];
    row[0] = 0;
#pragma unroll
    for (int y = 1; y < 16; ++y) row[y] = row[y & (y - 1)] + column[lowest_bit(y)];
#pragma unroll
    for (int y = 0; y < 16; ++y) tables[task * 16 + y] = static_cast<acc_t>(row[y]);
  }
}

// scores[s,u] = sqrt(max(e^T G'_s e, 0)) / |E| with e the excluder mask of unit u. Block of
// kThreads per (slice of units, sample s), grid-stride over samples in y: the block builds the
// tables of s in shared memory, then thread tid scores units blockIdx.x * kThreads + tid + i *
// gridDim.x * kThreads, one table read per pair of nibbles (random reads of shared memory).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    first_order_tables_kernel(const uint8_t* __restrict__ code, const uint64_t* __restrict__ masks,
                              const int32_t* __restrict__ counts, const scalar_t* __restrict__ gram,
                              const double* __restrict__ centred, const double* __restrict__ means,
                              int64_t S, int64_t N, int M, acc_t* __restrict__ scores) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* tables = reinterpret_cast<acc_t*>(shared_bytes);
  const int C = (M + 3) / 4, pairs = C * (C + 1) / 2;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const bool direct = !isfinite(means[s * (2 * M + 1) + 2 * M]);  // uniform over the block
    if (!direct) {
      __syncthreads();  // every thread is done with the previous sample's tables
      build_pair_tables(centred + s * M * M, M, C, pairs, tables);
      __syncthreads();
    }
    for (int64_t u = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; u < N; u += stride) {
      acc_t score;
      if (direct) {
        score = static_cast<acc_t>(first_order_direct(code + u * M, gram + s * M * M, M));
      } else {
        const uint64_t e = masks[u];
        const int k = counts[u];
        acc_t quad = 0;
        int diagonal = 0;  // table index of the pair (p, p)
        for (int p = 0; p < C; ++p) {
          const acc_t* t = tables + diagonal * 256 + ((e >> (4 * p)) & 15) * 16;
          for (int q = p; q < C; ++q) quad += t[(q - p) * 256 + ((e >> (4 * q)) & 15)];
          diagonal += C - p;
        }
        score = k == 0   ? std::numeric_limits<acc_t>::quiet_NaN()
                : k == M ? acc_t(0)  // ablating it changes nothing
                         : sqrt(quad < 0 ? acc_t(0) : quad) / k;
      }
      scores[s * N + u] = score;
    }
  }
}

// --------------------------------------------------------------- first order: tiles of G'

// The same scores for any M. Block of 32 x 8 threads: 32 units u0 + ty + 8r (warp ty holds
// r < 4), looping over samples s (grid-stride in y). G'_s goes by in 32 x 32 tiles staged in
// shared memory, lane tx on column j0 + tx, so that each tile load serves 32 units; a unit's
// excluder bits over the tile's rows i0..i0+31 come from one warp ballot.
template <typename scalar_t, typename acc_t>
__global__ void first_order_tiles_kernel(const uint8_t* __restrict__ code,
                                         const scalar_t* __restrict__ gram,
                                         const acc_t* __restrict__ centred,
                                         const double* __restrict__ means, int64_t S, int64_t N,
                                         int64_t M, acc_t* __restrict__ scores) {
  __shared__ acc_t tile[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  int64_t unit[kPerWarp];
  for (int r = 0; r < kPerWarp; ++r) unit[r] = int64_t{blockIdx.x} * kTile + ty + kTileRows * r;
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    if (!isfinite(means[s * (2 * M + 1) + 2 * M])) {  // uniform over the block
      for (int r = 0; r < kPerWarp; ++r) {
        if (tx == 0 && unit[r] < N)
          scores[s * N + unit[r]] =
              static_cast<acc_t>(first_order_direct(code + unit[r] * M, gram + s * M * M, M));
      }
      continue;
    }
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
          if (ex) quad[r] += partial[r];  // select, never multiply: 0 * inf is NaN
        }
      }
    }
    for (int r = 0; r < kPerWarp; ++r) {
      const acc_t q = warp_sum(quad[r]);
      if (tx == 0 && unit[r] < N) {
        scores[s * N + unit[r]] = count[r] == 0   ? std::numeric_limits<acc_t>::quiet_NaN()
                                  : count[r] == M ? acc_t(0)
                                                  : sqrt(q < 0 ? acc_t(0) : q) / count[r];
      }
    }
  }
}

// ------------------------------------------------------------------------ loss contrast

// scores[q,u] = (sum_{m in E} L'[q,m]) (1/|E| + 1/(M-|E|)). Block of 32 x 8 threads:
// lane tx on unit u0 + tx, warp ty on queries q0 + ty + 8r (r < 4), looping over query
// tiles (grid-stride in y). Members go by in tiles of 32 staged in shared memory: excluder
// flags [member][unit] and centred losses [query][member] (a broadcast per warp).
template <typename scalar_t, typename acc_t>
__global__ void loss_contrast_kernel(const uint8_t* __restrict__ code,
                                     const scalar_t* __restrict__ losses,
                                     const acc_t* __restrict__ centred,
                                     const double* __restrict__ row_mean, int64_t Q, int64_t N,
                                     int64_t M, acc_t* __restrict__ scores) {
  __shared__ bool excluded[kTile][kTile + 1];
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
        excluded[tx][rr] = unit < N && m < M && code[unit * M + m] == 0;
        loss[rr][tx] = q < Q && m < M ? centred[q * M + m] : acc_t(0);
      }
      __syncthreads();
      for (int mm = 0; mm < kTile; ++mm) {
        const bool e = excluded[mm][tx];
        count += e;
        for (int r = 0; r < kPerWarp; ++r)
          sum[r] += e ? loss[ty + kTileRows * r][mm] : acc_t(0);  // select: 0 * inf is NaN
      }
    }
    const bool valid = count > 0 && count < M;
    const acc_t scale = valid ? acc_t(1) / count + acc_t(1) / (M - count) : acc_t(0);
    for (int r = 0; r < kPerWarp; ++r) {
      const int64_t q = q0 + ty + kTileRows * r;
      if (q >= Q || u >= N) continue;
      scores[q * N + u] = !isfinite(row_mean[q])
                              ? static_cast<acc_t>(loss_direct(code + u * M, losses + q * M, M))
                          : valid ? sum[r] * scale
                                  : std::numeric_limits<acc_t>::quiet_NaN();
    }
  }
}

// ------------------------------------------------------------------------------ the ops

template <typename scalar_t>
void first_order_scores(const at::Tensor& code, const at::Tensor& gram, const ScoreShape& shape,
                        at::Tensor& scores, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t S = shape.rows, N = shape.units, M = shape.members;
  const scalar_t* raw = gram.const_data_ptr<scalar_t>();
  const uint8_t* code_p = code.const_data_ptr<uint8_t>();
  const auto options = scores.options();
  auto means = at::empty({S, 2 * M + 1}, options.dtype(at::kDouble));
  gram_means_kernel<<<blocks_for(S, 1), kThreads, 0, stream>>>(raw, S, M,
                                                               means.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t C = (M + 3) / 4, table_bytes = C * (C + 1) / 2 * 256 * sizeof(acc_t);
  const int device = code.get_device();
  int multiprocessors = 0, shared_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (M <= 64 && table_bytes <= std::min<int64_t>(kTableBytesMax, shared_optin)) {
    auto centred = at::empty({S, M, M}, options.dtype(at::kDouble));
    centre_gram_kernel<<<blocks_for(S * M * M), kThreads, 0, stream>>>(
        raw, means.const_data_ptr<double>(), S, M, centred.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto masks = at::empty({N}, options.dtype(at::kLong));
    auto counts = at::empty({N}, options.dtype(at::kInt));
    uint64_t* masks_p = reinterpret_cast<uint64_t*>(masks.mutable_data_ptr<int64_t>());
    exclusion_masks_kernel<<<blocks_for(N), kThreads, 0, stream>>>(
        code_p, N, M, masks_p, counts.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto kernel = first_order_tables_kernel<scalar_t, acc_t>;
    if (table_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(table_bytes)));
    }
    // enough unit slices for ~4 blocks per multiprocessor, each slice long enough to amortise
    // building the tables (up to kUnitsPerTableBlock units)
    const int64_t samples = std::min<int64_t>(S, kMaxGridY);
    const int64_t wanted = (4 * int64_t{multiprocessors} + samples - 1) / samples;
    const int64_t slices =
        std::min(std::max((N + kUnitsPerTableBlock - 1) / kUnitsPerTableBlock, wanted),
                 (N + kThreads - 1) / kThreads);
    kernel<<<dim3(static_cast<unsigned>(slices), grid_y_for(S)), kThreads, table_bytes, stream>>>(
        code_p, masks_p, counts.const_data_ptr<int32_t>(), raw, centred.const_data_ptr<double>(),
        means.const_data_ptr<double>(), S, N, static_cast<int>(M),
        scores.mutable_data_ptr<acc_t>());
  } else {
    auto centred = at::empty({S, M, M}, options);
    centre_gram_kernel<<<blocks_for(S * M * M), kThreads, 0, stream>>>(
        raw, means.const_data_ptr<double>(), S, M, centred.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned unit_tiles = static_cast<unsigned>((N + kTile - 1) / kTile);
    first_order_tiles_kernel<<<dim3(unit_tiles, grid_y_for(S)), dim3(kTile, kTileRows), 0,
                               stream>>>(code_p, raw, centred.const_data_ptr<acc_t>(),
                                         means.const_data_ptr<double>(), S, N, M,
                                         scores.mutable_data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void loss_contrast_scores(const at::Tensor& code, const at::Tensor& losses, const ScoreShape& shape,
                          at::Tensor& scores, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t Q = shape.rows, N = shape.units, M = shape.members;
  const scalar_t* raw = losses.const_data_ptr<scalar_t>();
  auto centred = at::empty({Q, M}, scores.options());
  auto row_mean = at::empty({Q}, scores.options().dtype(at::kDouble));
  centre_losses_kernel<<<blocks_for(Q * kWarpSize), kThreads, 0, stream>>>(
      raw, Q, M, centred.mutable_data_ptr<acc_t>(), row_mean.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned unit_tiles = static_cast<unsigned>((N + kTile - 1) / kTile);
  loss_contrast_kernel<<<dim3(unit_tiles, grid_y_for((Q + kTile - 1) / kTile)),
                         dim3(kTile, kTileRows), 0, stream>>>(
      code.const_data_ptr<uint8_t>(), raw, centred.const_data_ptr<acc_t>(),
      row_mean.const_data_ptr<double>(), Q, N, M, scores.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kFirstOrder>
std::tuple<at::Tensor, at::Tensor, at::Tensor> code_scores_cuda(
    const at::Tensor& code_, const at::Tensor& stats_, int64_t k, int64_t unit_offset,
    const std::optional<at::Tensor>& prev_values, const std::optional<at::Tensor>& prev_indices) {
  const char* op = kFirstOrder ? "code_first_order" : "code_loss_contrast";
  const auto shape = check_code_scores(op, kFirstOrder ? "gram" : "losses", code_, stats_,
                                       kFirstOrder ? 3 : 2, k, prev_values, prev_indices);
  c10::cuda::CUDAGuard guard(code_.device());
  const auto code = code_.contiguous(), stats = stats_.contiguous();
  const auto acc_options = stats.options().dtype(accumulate_type(stats.scalar_type()));
  const int64_t S = shape.rows, N = shape.units, M = shape.members;
  auto scores = at::empty({S, N}, acc_options);
  auto top_values = at::empty({S, k}, acc_options);
  auto top_indices = at::empty({S, k}, acc_options.dtype(at::kLong));
  if (S == 0) return {scores, top_values, top_indices};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, stats.scalar_type(), "code_scores_cuda",
                                  [&] {
    using acc_t = opmath_t<scalar_t>;
    if (N > 0 && M == 0) {
      scores.fill_(std::numeric_limits<double>::quiet_NaN());  // no member: no excluder
    } else if (N > 0 && kFirstOrder) {
      first_order_scores<scalar_t>(code, stats, shape, scores, stream);
    } else if (N > 0) {
      loss_contrast_scores<scalar_t>(code, stats, shape, scores, stream);
    }
    if (k > kSelectTopkMax) {
      std::tie(top_values, top_indices) =
          merge_topk_by_sort(scores, k, unit_offset, prev_values, prev_indices);
    } else if (k > 0) {
      const auto pv = prev_values ? prev_values->contiguous() : at::Tensor();
      const auto pi = prev_indices ? prev_indices->contiguous() : at::Tensor();
      merge_topk_cuda<acc_t>(scores, static_cast<int>(k), unit_offset, pv, pi, top_values,
                             top_indices, stream);
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
