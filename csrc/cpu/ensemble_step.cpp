// CPU kernel of ensemble_step: trajectories split across threads; each thread
// gathers its trajectory's member outputs through the CSR list (no atomics),
// applies the sampler update and scatters the result into the next packed input.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../checks.h"
#include "utils.h"

namespace ensattr_fast {
namespace {

constexpr const char* kOp = "ensemble_step";

template <typename scalar_t>
void step_trajectory(int64_t t, int64_t D, const scalar_t* eps, const scalar_t* x,
                     const scalar_t* z, const int64_t* row_ptr, const int64_t* rows,
                     const scalar_t* weights, scalar_t a, scalar_t b, scalar_t c, scalar_t d,
                     scalar_t s, scalar_t lo, scalar_t hi, scalar_t* x_next, scalar_t* eps_bar,
                     scalar_t* packed) {
  scalar_t* eb = eps_bar + t * D;
  std::fill(eb, eb + D, scalar_t(0));
  for (int64_t j = row_ptr[t]; j < row_ptr[t + 1]; ++j) {
    const scalar_t w = weights[j];
    const scalar_t* e = eps + rows[j] * D;
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) eb[k] += w * e[k];
  }
  const scalar_t* xt = x + t * D;
  scalar_t* xn = x_next + t * D;
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) {
    const scalar_t x0 = std::min(std::max(a * xt[k] + b * eb[k], lo), hi);
    xn[k] = c * x0 + d * xt[k];
  }
  if (z != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) xn[k] += s * z[k];
  }
  if (packed != nullptr) {
    for (int64_t j = row_ptr[t]; j < row_ptr[t + 1]; ++j)
      std::memcpy(packed + rows[j] * D, xn, D * sizeof(scalar_t));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_step_cpu(
    const at::Tensor& member_eps_, const at::Tensor& x_, const std::optional<at::Tensor>& noise_,
    const std::optional<at::Tensor>& sample_of_, const at::Tensor& row_ptr_,
    const at::Tensor& rows_, const at::Tensor& weights_, double a, double b, double c, double d,
    double s, double clip_min, double clip_max, bool write_packed) {
  const auto shape = check_ensemble_step(kOp, member_eps_, x_, noise_, sample_of_, row_ptr_, rows_,
                                         weights_, write_packed);
  const auto member_eps = member_eps_.contiguous(), x = x_.contiguous();
  const auto row_ptr = row_ptr_.contiguous(), rows = rows_.contiguous();
  const auto weights = weights_.contiguous();
  const auto noise = noise_.has_value() ? std::optional(noise_->contiguous()) : std::nullopt;
  const auto sample_of =
      sample_of_.has_value() ? std::optional(sample_of_->contiguous()) : std::nullopt;
  check_ensemble_step_indices(kOp, row_ptr, rows, sample_of, shape.packed, shape.noise_rows,
                              write_packed);

  const int64_t T = shape.trajectories, D = shape.dim;
  auto x_next = at::empty({T, D}, x.options());
  auto eps_bar = at::empty({T, D}, x.options());
  auto packed = at::empty({write_packed ? shape.packed : 0, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ensemble_step", [&] {
    const scalar_t* eps = member_eps.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* z = noise ? noise->const_data_ptr<scalar_t>() : nullptr;
    const int64_t* so = sample_of ? sample_of->const_data_ptr<int64_t>() : nullptr;
    const int64_t* ptr = row_ptr.const_data_ptr<int64_t>();
    const int64_t* r = rows.const_data_ptr<int64_t>();
    const scalar_t* w = weights.const_data_ptr<scalar_t>();
    scalar_t* xn = x_next.mutable_data_ptr<scalar_t>();
    scalar_t* eb = eps_bar.mutable_data_ptr<scalar_t>();
    scalar_t* pk = write_packed ? packed.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, T, grain_rows(D), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* zt = z == nullptr ? nullptr : z + (so ? so[t] : t) * D;
        step_trajectory<scalar_t>(t, D, eps, xp, zt, ptr, r, w, a, b, c, d, s, clip_min, clip_max,
                                  xn, eb, pk);
      }
    });
  });
  return {x_next, eps_bar, packed};
}

// The index checks alone, for CSR lists that a CUDA step will use (ops.py copies them here).
void ensemble_step_check_indices_cpu(const at::Tensor& row_ptr, const at::Tensor& rows,
                                     const std::optional<at::Tensor>& sample_of, int64_t packed,
                                     int64_t noise_rows, bool write_packed) {
  check_rank(kOp, "row_ptr", row_ptr, 1);
  check_rank(kOp, "rows", rows, 1);
  check_dtype(kOp, "row_ptr", row_ptr, at::kLong);
  check_dtype(kOp, "rows", rows, at::kLong);
  std::optional<at::Tensor> so;
  if (sample_of.has_value()) {
    check_rank(kOp, "sample_of", *sample_of, 1);
    check_dtype(kOp, "sample_of", *sample_of, at::kLong);
    so = sample_of->contiguous();
  }
  check_ensemble_step_indices(kOp, row_ptr.contiguous(), rows.contiguous(), so, packed, noise_rows,
                              write_packed);
}

}  // namespace

TORCH_LIBRARY_IMPL(ensattr_fast, CPU, m) {
  m.impl("ensemble_step", &ensemble_step_cpu);
  m.impl("ensemble_step_check_indices", &ensemble_step_check_indices_cpu);
}

}  // namespace ensattr_fast
