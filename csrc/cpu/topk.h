// Running top-k per row on the CPU: rows split across threads, a k-element
// min-heap per row over the previous top-k and this chunk's scores.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace ensattr_fast {

// Larger score first; on equal scores the lower unit index, so that results
// do not depend on how units were chunked.
template <typename scalar_t>
bool better(const std::pair<scalar_t, int64_t>& a, const std::pair<scalar_t, int64_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// top_values/top_indices [R,k] := top-k of (prev [R,k], scores [R,N] with units
// unit_offset + n). NaN never enters; empty slots hold -inf and -1.
template <typename scalar_t>
void merge_topk_cpu(const at::Tensor& scores, int64_t k, int64_t unit_offset,
                    const std::optional<at::Tensor>& prev_values,
                    const std::optional<at::Tensor>& prev_indices, at::Tensor& top_values,
                    at::Tensor& top_indices) {
  using Entry = std::pair<scalar_t, int64_t>;
  const int64_t R = scores.size(0), N = scores.size(1);
  const scalar_t* sc = scores.const_data_ptr<scalar_t>();
  const auto pv = prev_values ? prev_values->contiguous() : at::Tensor();
  const auto pi = prev_indices ? prev_indices->contiguous() : at::Tensor();
  scalar_t* tv = top_values.mutable_data_ptr<scalar_t>();
  int64_t* ti = top_indices.mutable_data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<Entry> heap;
    heap.reserve(k);
    const auto offer = [&](scalar_t value, int64_t index) {
      if (std::isnan(value) || index < 0) return;
      const Entry entry{value, index};
      if (static_cast<int64_t>(heap.size()) < k) {
        heap.push_back(entry);
        std::push_heap(heap.begin(), heap.end(), better<scalar_t>);
      } else if (better(entry, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), better<scalar_t>);
        heap.back() = entry;
        std::push_heap(heap.begin(), heap.end(), better<scalar_t>);
      }
    };
    for (int64_t r = begin; r < end; ++r) {
      heap.clear();
      if (pv.defined()) {
        for (int64_t j = 0; j < k; ++j)
          offer(pv.const_data_ptr<scalar_t>()[r * k + j], pi.const_data_ptr<int64_t>()[r * k + j]);
      }
      for (int64_t n = 0; n < N; ++n) offer(sc[r * N + n], unit_offset + n);
      std::sort_heap(heap.begin(), heap.end(), better<scalar_t>);
      for (int64_t j = 0; j < k; ++j) {
        const bool filled = j < static_cast<int64_t>(heap.size());
        tv[r * k + j] = filled ? heap[j].first : -std::numeric_limits<scalar_t>::infinity();
        ti[r * k + j] = filled ? heap[j].second : -1;
      }
    }
  });
}

}  // namespace ensattr_fast
