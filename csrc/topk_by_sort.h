// The running top-k for large k, on either device, by two stable sorts (the reference's
// algorithm, in ATen ops). Small k is merged by a per-row selection instead (a heap on the
// CPU, a warp-wide queue on CUDA), which reads the scores once; a selection keeps k entries
// per row close to the threads, so large k goes here. Both give the same answer: larger
// score first, ties to the lower unit, NaN and index -1 never selected, -inf / -1 padding.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace ensattr_fast {

// Largest k merged by a per-row selection; larger k by sorting.
constexpr int64_t kSelectTopkMax = 32;

// (values [R,k], indices [R,k]) := top-k of (prev [R,k], scores [R,N] of units unit_offset + n).
inline std::tuple<at::Tensor, at::Tensor> merge_topk_by_sort(
    const at::Tensor& scores, int64_t k, int64_t unit_offset,
    const std::optional<at::Tensor>& prev_values, const std::optional<at::Tensor>& prev_indices) {
  const int64_t R = scores.size(0), N = scores.size(1);
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor values = scores;
  at::Tensor indices =
      at::arange(unit_offset, unit_offset + N, scores.options().dtype(at::kLong)).expand({R, N});
  if (prev_values.has_value()) {
    values = at::cat({*prev_values, values}, 1);
    indices = at::cat({*prev_indices, indices}, 1);
  }
  if (values.size(1) < k) {
    const int64_t pad = k - values.size(1);
    values = at::cat({values, at::full({R, pad}, -inf, values.options())}, 1);
    indices = at::cat({indices, at::full({R, pad}, -1, indices.options())}, 1);
  }
  const auto empty = values.isnan().logical_or(indices.lt(0));
  values = at::where(empty, -inf, values.add(0));  // + 0 makes -0.0 the +0.0 it equals
  indices = at::where(empty, -1, indices);
  // stable sorts: by unit (empty slots last), then by decreasing score
  const std::optional<bool> stable = true;  // (a plain bool would pick sort(dim, descending))
  const auto by_unit = std::get<1>(
      at::sort(at::where(empty, std::numeric_limits<int64_t>::max(), indices), stable, 1));
  values = values.gather(1, by_unit);
  indices = indices.gather(1, by_unit);
  const auto order = std::get<1>(at::sort(values, stable, 1, /*descending=*/true)).narrow(1, 0, k);
  return {values.gather(1, order).contiguous(), indices.gather(1, order).contiguous()};
}

}  // namespace ensattr_fast
