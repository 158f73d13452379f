// CPU kernels of the code_scores family.
//
// Both scores use a weight change v_u with sum(v_u) = 0, so adding a constant
// to every member's statistic changes nothing. Centring the statistics first
// (in double) removes that common part before the float sums and avoids the
// cancellation it would cause: member outputs and losses are nearly equal.
//
// After centring, a unit's score depends on its excluder set E only through
// e^T G' e (first order) or sum_{m in E} L'_m (loss). Both are sums over the
// bits of e, so the members are split into nibbles of 4 and, per row s, tables
// hold the partial sum of every pair of nibble patterns (first order: 16 x 16
// entries per pair of nibbles, G' symmetrised) or every nibble pattern (loss).
// A score is then (C + 1) C / 2 or C table reads for C = ceil(M / 4) nibbles,
// instead of M^2 / 4 or M multiply-adds. Tasks are (row, block of units): the
// table of a row stays in L1 while the block's units stream past.
//
// A row holding an infinite (or NaN) statistic cannot be centred (inf - inf), so it
// is scored directly from the raw statistics, term by term as the reference does:
// an infinite loss gives +-inf, not NaN.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../topk_by_sort.h"
#include "topk.h"

namespace ensattr_fast {
namespace {

constexpr int64_t kUnitBlock = 2048;

// The excluder pattern of every unit, 4 members per byte: [N, C].
struct Nibbles {
  int64_t count;                 // C
  int64_t members;               // M
  std::vector<uint8_t> pattern;  // bit i of pattern[u * C + c]: member 4c + i excludes u
  std::vector<int32_t> excluders;

  Nibbles(const uint8_t* code, int64_t N, int64_t M)
      : count((M + 3) / 4), members(M), pattern(N * count), excluders(N) {
    at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        int32_t k = 0;
        for (int64_t m = 0; m < M; ++m) {
          const bool excluded = code[u * M + m] == 0;
          pattern[u * count + m / 4] |= static_cast<uint8_t>(excluded << (m % 4));
          k += excluded;
        }
        excluders[u] = k;
      }
    });
  }

  bool excluded(int64_t u, int64_t m) const { return pattern[u * count + m / 4] >> (m % 4) & 1; }
};

// The doubly centred, symmetrised Gram of one row, in double: G' = P (G + G^T)/2 P.
// False (and sym unusable) when G holds a non-finite value.
template <typename scalar_t>
bool centred_gram(const scalar_t* g, int64_t M, std::vector<double>& sym) {
  std::vector<double> row(M, 0.0);
  sym.resize(M * M);
  double total = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < M; ++j) {
      sym[i * M + j] = 0.5 * (static_cast<double>(g[i * M + j]) + g[j * M + i]);
      row[i] += sym[i * M + j];
      total += sym[i * M + j];
    }
  if (!std::isfinite(total)) return false;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < M; ++j) sym[i * M + j] += -row[i] / M - row[j] / M + total / (M * M);
  return true;
}

// sqrt(v^T G v) with v = e/|E| - 1/M, term by term from the raw G (rows that cannot be centred).
template <typename scalar_t>
scalar_t first_order_direct(const Nibbles& nib, int64_t u, const scalar_t* g) {
  const int64_t M = nib.members;
  const int32_t k = nib.excluders[u];
  if (k == 0) return std::numeric_limits<scalar_t>::quiet_NaN();
  if (k == M) return scalar_t(0);
  const double ex = 1.0 / k - 1.0 / M, in = -1.0 / M;
  double quad = 0;
  for (int64_t i = 0; i < M; ++i) {
    const double vi = nib.excluded(u, i) ? ex : in;
    for (int64_t j = 0; j < M; ++j) quad += vi * (nib.excluded(u, j) ? ex : in) * g[i * M + j];
  }
  return static_cast<scalar_t>(std::sqrt(std::max(quad, 0.0)));  // keeps NaN
}

// table[(pair, x, y)] = sum_{i in x, j in y} G'[4p + i, 4q + j] for nibble pairs
// p <= q (off-diagonal pairs counted twice), 256 entries per pair.
template <typename acc_t>
void pair_tables(const std::vector<double>& gp, int64_t M, int64_t C, acc_t* table) {
  double partial[16][4];
  int64_t pair = 0;
  for (int64_t p = 0; p < C; ++p) {
    for (int64_t q = p; q < C; ++q, ++pair) {
      const double twice = p == q ? 1.0 : 2.0;
      for (int x = 0; x < 16; ++x)
        for (int j = 0; j < 4; ++j) {
          double sum = 0;
          for (int i = 0; i < 4; ++i)
            if ((x >> i & 1) && 4 * p + i < M && 4 * q + j < M)
              sum += gp[(4 * p + i) * M + 4 * q + j];
          partial[x][j] = sum;
        }
      for (int x = 0; x < 16; ++x)
        for (int y = 0; y < 16; ++y) {
          double sum = 0;
          for (int j = 0; j < 4; ++j)
            if (y >> j & 1) sum += partial[x][j];
          table[(pair * 16 + x) * 16 + y] = static_cast<acc_t>(twice * sum);
        }
    }
  }
}

// e^T G' e from the pair tables: one read per pair of nibbles, summed in four
// independent chains (one chain would wait on the add latency). With C known at
// compile time the loops unroll and the sums stay in registers.
template <int kC, typename scalar_t>
scalar_t quad_form(const scalar_t* table, const uint8_t* pat, int64_t C) {
  const int64_t count = kC > 0 ? kC : C;
  scalar_t acc[4] = {0, 0, 0, 0};
  int64_t n = 0;
#pragma GCC unroll 16
  for (int64_t p = 0; p < count; ++p) {
#pragma GCC unroll 16
    for (int64_t q = p; q < count; ++q, ++n) acc[n & 3] += table[(n * 16 + pat[p]) * 16 + pat[q]];
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

template <int kC, typename scalar_t>
void first_order_block(const Nibbles& nib, const scalar_t* table, int64_t begin, int64_t end,
                       scalar_t* out) {
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  for (int64_t u = begin; u < end; ++u) {
    const scalar_t quad = quad_form<kC>(table, nib.pattern.data() + u * nib.count, nib.count);
    const int32_t k = nib.excluders[u];
    // no excluder: no ablation; every member excluded: the ablated ensemble is the full one
    out[u] = k == 0             ? nan
             : k == nib.members ? scalar_t(0)
                                : std::sqrt(std::max(quad, scalar_t(0))) / k;
  }
}

template <typename scalar_t>
void first_order_scores(const Nibbles& nib, const scalar_t* gram, int64_t S, int64_t N, int64_t M,
                        scalar_t* scores) {
  const int64_t C = nib.count, pairs = C * (C + 1) / 2;
  const int64_t blocks = (N + kUnitBlock - 1) / kUnitBlock;
  at::parallel_for(0, S * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> table(pairs * 256);
    std::vector<double> centred;
    int64_t built = -1;
    bool finite = true;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / blocks, b = task % blocks;
      if (s != built) {
        finite = centred_gram(gram + s * M * M, M, centred);
        if (finite) pair_tables(centred, M, C, table.data());
        built = s;
      }
      const int64_t lo = b * kUnitBlock, hi = std::min(N, (b + 1) * kUnitBlock);
      scalar_t* out = scores + s * N;
      if (!finite) {
        for (int64_t u = lo; u < hi; ++u) out[u] = first_order_direct(nib, u, gram + s * M * M);
        continue;
      }
      switch (C) {  // the common member counts, M = 4 C, unrolled
        case 2: first_order_block<2>(nib, table.data(), lo, hi, out); break;
        case 3: first_order_block<3>(nib, table.data(), lo, hi, out); break;
        case 4: first_order_block<4>(nib, table.data(), lo, hi, out); break;
        case 5: first_order_block<5>(nib, table.data(), lo, hi, out); break;
        case 6: first_order_block<6>(nib, table.data(), lo, hi, out); break;
        case 8: first_order_block<8>(nib, table.data(), lo, hi, out); break;
        case 10: first_order_block<10>(nib, table.data(), lo, hi, out); break;
        case 12: first_order_block<12>(nib, table.data(), lo, hi, out); break;
        case 16: first_order_block<16>(nib, table.data(), lo, hi, out); break;
        default: first_order_block<0>(nib, table.data(), lo, hi, out);
      }
    }
  });
}

template <typename scalar_t>
void loss_contrast_scores(const Nibbles& nib, const scalar_t* losses, int64_t Q, int64_t N,
                          int64_t M, scalar_t* scores) {
  const int64_t C = nib.count, blocks = (N + kUnitBlock - 1) / kUnitBlock;
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  at::parallel_for(0, Q * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> table(C * 16);
    int64_t built = -1;
    bool finite = true;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t q = task / blocks, b = task % blocks;
      const scalar_t* l = losses + q * M;
      if (q != built) {  // table[c, x] = sum_{i in x} (L - mean L)[4c + i]
        double mean = 0;
        for (int64_t m = 0; m < M; ++m) mean += l[m];
        mean /= std::max<int64_t>(M, 1);
        finite = std::isfinite(mean);
        for (int64_t c = 0; c < C; ++c)
          for (int x = 0; x < 16; ++x) {
            double sum = 0;
            for (int i = 0; i < 4; ++i)
              if ((x >> i & 1) && 4 * c + i < M) sum += l[4 * c + i] - mean;
            table[c * 16 + x] = static_cast<scalar_t>(sum);
          }
        built = q;
      }
      scalar_t* out = scores + q * N;
      for (int64_t u = b * kUnitBlock; u < std::min(N, (b + 1) * kUnitBlock); ++u) {
        const int32_t k = nib.excluders[u];
        if (!finite) {  // mean over E minus mean over I, from the raw losses
          double sum_ex = 0, sum_in = 0;
          for (int64_t m = 0; m < M; ++m) (nib.excluded(u, m) ? sum_ex : sum_in) += l[m];
          out[u] = k > 0 && k < M ? static_cast<scalar_t>(sum_ex / k - sum_in / (M - k)) : nan;
          continue;
        }
        const uint8_t* pat = nib.pattern.data() + u * C;
        scalar_t acc[4] = {0, 0, 0, 0};
        for (int64_t c = 0; c < C; ++c) acc[c & 3] += table[c * 16 + pat[c]];
        const scalar_t excluded = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        const bool valid = k > 0 && k < M;
        out[u] = valid ? excluded * (scalar_t(1) / k + scalar_t(1) / (M - k)) : nan;
      }
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
    const Nibbles nibbles(code.const_data_ptr<uint8_t>(), shape.units, shape.members);
    scalar_t* out = scores.mutable_data_ptr<scalar_t>();
    if constexpr (kFirstOrder) {
      first_order_scores(nibbles, stats.const_data_ptr<scalar_t>(), shape.rows, shape.units,
                         shape.members, out);
    } else {
      loss_contrast_scores(nibbles, stats.const_data_ptr<scalar_t>(), shape.rows, shape.units,
                           shape.members, out);
    }
    if (k > kSelectTopkMax) {
      std::tie(top_values, top_indices) =
          merge_topk_by_sort(scores, k, unit_offset, prev_values, prev_indices);
    } else if (k > 0) {
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
