// Helpers shared by the CUDA kernels: launch sizes and warp/block reductions.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

namespace ensattr_fast {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;
// Enough blocks to fill any current GPU; grid-stride loops cover the rest.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;
constexpr int64_t kMaxGridY = 65535;

// Inputs in half/bfloat16 accumulate in float; float and double in themselves.
template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Blocks of `threads` for a grid-stride loop over `items` work items (> 0).
inline unsigned blocks_for(int64_t items, int64_t threads = kThreads) {
  return static_cast<unsigned>(std::min((items + threads - 1) / threads, kMaxBlocks));
}

inline unsigned grid_y_for(int64_t items) {
  return static_cast<unsigned>(std::min(items, kMaxGridY));
}

// Sum over the 32 lanes of a warp; every lane gets the result. All lanes must call it.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Sum over a 1-D block (a multiple of 32 threads); every thread gets the result.
// `shared` holds kWarpSize values; the leading barrier makes back-to-back calls safe.
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* shared) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  value = warp_sum(value);
  __syncthreads();
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  const int warps = blockDim.x / kWarpSize;
  return warp_sum(lane < warps ? shared[lane] : T(0));
}

}  // namespace ensattr_fast
