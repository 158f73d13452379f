// Helpers shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace ensattr_fast {

// Rows of length `dim` per at::parallel_for task: enough work (~32k elements)
// that scheduling costs nothing, few enough that both threads stay busy.
inline int64_t grain_rows(int64_t dim) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(dim, 1));
}

}  // namespace ensattr_fast
