// Helpers shared by the CUDA kernels: launch sizes, vector accesses, warp/block reductions.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

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

// V consecutive elements moved by one access of sizeof(T) * V bytes (16 for the vector paths);
// the address must be a multiple of that size.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Elements per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// 16-byte vectors go through uint4 and the __ldg / __stwb intrinsics, which are always one
// instruction (a struct copy may be split into scalar stores, e.g. in an unrolled loop).
template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  if constexpr (sizeof(Vec<T, V>) == 16) {
    const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p));
    Vec<T, V> value;
    memcpy(&value, &bits, 16);
    return value;
  } else {
    return *reinterpret_cast<const Vec<T, V>*>(p);
  }
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& value) {
  if constexpr (sizeof(Vec<T, V>) == 16) {
    uint4 bits;
    memcpy(&bits, &value, 16);
    __stwb(reinterpret_cast<uint4*>(p), bits);
  } else {
    *reinterpret_cast<Vec<T, V>*>(p) = value;
  }
}

// True when every pointer is 16-byte aligned (null pointers count as aligned).
inline bool aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return true;
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
