// CPU kernels of the code_scores family: units split across threads; each unit's
// code row is read once and scored against every sample (first order) or
// query (loss contrast); then a running top-k per row, rows split across threads.
//
// Both scores use a weight change v_u with sum(v_u) = 0, so adding a constant
// to every member's statistic changes nothing. Centring the statistics first
// (in double) removes that common part before the float sums and avoids the
// cancellation it would cause: member outputs and losses are nearly equal.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "topk.h"

namespace ensattr_fast {
namespace {

constexpr int64_t kUnitGrain = 128;

// G'_s = P G_s P with P = I - 11^T/M, so that v^T G v = e^T G' e / |E|^2 for
// v = e/|E| - 1/M (e: the excluder indicator).
template <typename scalar_t>
std::vector<scalar_t> centred_grams(const scalar_t* gram, int64_t S, int64_t M) {
  std::vector<scalar_t> out(S * M * M);
  std::vector<double> row(M), col(M);
  for (int64_t s = 0; s < S; ++s) {
    const scalar_t* g = gram + s * M * M;
    double total = 0;
    std::fill(row.begin(), row.end(), 0.0);
    std::fill(col.begin(), col.end(), 0.0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < M; ++j) {
        row[i] += g[i * M + j];
        col[j] += g[i * M + j];
        total += g[i * M + j];
      }
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < M; ++j)
        out[(s * M + i) * M + j] =
            static_cast<scalar_t>(g[i * M + j] - row[i] / M - col[j] / M + total / (M * M));
  }
  return out;
}

// L'_q = L_q - mean(L_q): the contrast is then sum_{E} L' (1/|E| + 1/|I|).
template <typename scalar_t>
std::vector<scalar_t> centred_losses(const scalar_t* losses, int64_t Q, int64_t M) {
  std::vector<scalar_t> out(Q * M);
  for (int64_t q = 0; q < Q; ++q) {
    double mean = 0;
    for (int64_t m = 0; m < M; ++m) mean += losses[q * M + m];
    mean /= std::max<int64_t>(M, 1);
    for (int64_t m = 0; m < M; ++m)
      out[q * M + m] = static_cast<scalar_t>(losses[q * M + m] - mean);
  }
  return out;
}

// Calls score(u, excluder_indicator, excluder_list, n_excluders, scratch) for
// every unit; the buffers (M entries each) belong to the calling thread.
template <typename scalar_t, typename Score>
void for_each_unit(const uint8_t* code, int64_t N, int64_t M, const Score& score) {
  at::parallel_for(0, N, kUnitGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> e(M), scratch(M);
    std::vector<int64_t> ex(M);
    for (int64_t u = begin; u < end; ++u) {
      int64_t k = 0;
      for (int64_t m = 0; m < M; ++m) {
        const bool excluded = code[u * M + m] == 0;
        e[m] = excluded;
        if (excluded) ex[k++] = m;
      }
      score(u, e.data(), ex.data(), k, scratch.data());
    }
  });
}

template <typename scalar_t>
void first_order_scores(const uint8_t* code, const scalar_t* gram, int64_t S, int64_t N,
                        int64_t M, scalar_t* scores) {
  const auto centred = centred_grams(gram, S, M);
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  for_each_unit<scalar_t>(code, N, M, [&](int64_t u, const scalar_t* e, const int64_t* ex,
                                          int64_t k, scalar_t* y) {
    for (int64_t s = 0; s < S; ++s) {
      if (k == 0) {
        scores[s * N + u] = nan;
        continue;
      }
      const scalar_t* g = centred.data() + s * M * M;
      std::fill(y, y + M, scalar_t(0));
      for (int64_t i = 0; i < k; ++i) {
        const scalar_t* gi = g + ex[i] * M;
#pragma omp simd
        for (int64_t j = 0; j < M; ++j) y[j] += gi[j];
      }
      scalar_t quad = 0;
#pragma omp simd reduction(+ : quad)
      for (int64_t j = 0; j < M; ++j) quad += y[j] * e[j];
      scores[s * N + u] = std::sqrt(std::max(quad, scalar_t(0))) / k;
    }
  });
}

template <typename scalar_t>
void loss_contrast_scores(const uint8_t* code, const scalar_t* losses, int64_t Q, int64_t N,
                          int64_t M, scalar_t* scores) {
  const auto centred = centred_losses(losses, Q, M);
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  for_each_unit<scalar_t>(code, N, M, [&](int64_t u, const scalar_t* e, const int64_t*,
                                          int64_t k, scalar_t*) {
    const bool valid = k > 0 && k < M;
    const scalar_t scale = valid ? scalar_t(1) / k + scalar_t(1) / (M - k) : scalar_t(0);
    for (int64_t q = 0; q < Q; ++q) {
      const scalar_t* l = centred.data() + q * M;
      scalar_t excluded = 0;
#pragma omp simd reduction(+ : excluded)
      for (int64_t m = 0; m < M; ++m) excluded += e[m] * l[m];
      scores[q * N + u] = valid ? excluded * scale : nan;
    }
  });
}

template <bool kFirstOrder>
std::tuple<at::Tensor, at::Tensor, at::Tensor> code_scores_cpu(
    const at::Tensor& code_, const at::Tensor& stats_, int64_t k, int64_t unit_offset,
    const std::optional<at::Tensor>& prev_values, const std::optional<at::Tensor>& prev_indices) {
  const char* op = kFirstOrder ? "code_first_order" : "code_loss_contrast";
  const auto shape = check_code_scores(op, kFirstOrder ? "gram" : "losses", code_, stats_,
                                       kFirstOrder ? 3 : 2, k, prev_values, prev_indices);
  const auto code = code_.contiguous(), stats = stats_.contiguous();
  auto scores = at::empty({shape.rows, shape.units}, stats.options());
  auto top_values = at::empty({shape.rows, k}, stats.options());
  auto top_indices = at::empty({shape.rows, k}, stats.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "code_scores", [&] {
    const uint8_t* c = code.const_data_ptr<uint8_t>();
    scalar_t* out = scores.mutable_data_ptr<scalar_t>();
    if constexpr (kFirstOrder) {
      first_order_scores(c, stats.const_data_ptr<scalar_t>(), shape.rows, shape.units,
                         shape.members, out);
    } else {
      loss_contrast_scores(c, stats.const_data_ptr<scalar_t>(), shape.rows, shape.units,
                           shape.members, out);
    }
    if (k > 0) {
      merge_topk_cpu<scalar_t>(scores, k, unit_offset, prev_values, prev_indices, top_values,
                               top_indices);
    }
  });
  return {scores, top_values, top_indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(ensattr_fast, CPU, m) {
  m.impl("code_first_order", &code_scores_cpu<true>);
  m.impl("code_loss_contrast", &code_scores_cpu<false>);
}

}  // namespace ensattr_fast
