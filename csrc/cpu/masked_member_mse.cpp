// CPU kernels of masked_member_mse: rows (m, b) split across threads, the inner
// loop over D a SIMD reduction.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "utils.h"

namespace ensattr_fast {
namespace {

constexpr const char* kOp = "masked_member_mse";

// Mask-weighted mean over B of per_example, 0 for an all-zero mask row.
template <typename scalar_t>
void reduce_members(const scalar_t* per_example, const scalar_t* mask, int64_t M, int64_t B,
                    scalar_t* per_member) {
  for (int64_t m = 0; m < M; ++m) {
    scalar_t num = 0, total = 0;
    for (int64_t b = 0; b < B; ++b) {
      num += mask[m * B + b] * per_example[m * B + b];
      total += mask[m * B + b];
    }
    per_member[m] = total != 0 ? num / total : scalar_t(0);
  }
}

// per_example[r] = mean_d (pred[r,d] - target[r or r%B, d])^2 over rows r = (m, b).
template <typename scalar_t>
void squared_error_rows(const scalar_t* pred, const scalar_t* target, const MseShape& s,
                        scalar_t* per_example) {
  const int64_t B = s.batch, D = s.dim;
  const scalar_t inv_d = scalar_t(1) / std::max<int64_t>(D, 1);
  at::parallel_for(0, s.members * B, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* pr = pred + r * D;
      const scalar_t* tr = target + (s.broadcast_target ? r % B : r) * D;
      scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) {
        const scalar_t diff = pr[d] - tr[d];
        sum += diff * diff;
      }
      per_example[r] = sum * inv_d;
    }
  });
}

// grad_pred[m,b,:] = coef[m,b] (pred - target), where
// coef = 2/D (grad_per_example + grad_per_member[m] mask[m,b] / sum_b mask[m,b]).
template <typename scalar_t>
void fused_backward(const scalar_t* grad_example, const scalar_t* grad_member, const scalar_t* pred,
                    const scalar_t* target, const scalar_t* mask, const MseShape& s,
                    scalar_t* grad_pred) {
  const int64_t M = s.members, B = s.batch, D = s.dim;
  const scalar_t two_over_d = scalar_t(2) / std::max<int64_t>(D, 1);
  std::vector<scalar_t> coef(M * B);
  for (int64_t m = 0; m < M; ++m) {
    scalar_t total = 0;
    for (int64_t b = 0; b < B; ++b) total += mask[m * B + b];
    const scalar_t per_weight = total != 0 ? grad_member[m] / total : scalar_t(0);
    for (int64_t b = 0; b < B; ++b)
      coef[m * B + b] = two_over_d * (grad_example[m * B + b] + per_weight * mask[m * B + b]);
  }
  at::parallel_for(0, M * B, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* pr = pred + r * D;
      const scalar_t* tr = target + (s.broadcast_target ? r % B : r) * D;
      scalar_t* gr = grad_pred + r * D;
      const scalar_t cr = coef[r];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gr[d] = cr * (pr[d] - tr[d]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& pred_, const at::Tensor& target_,
                                               const at::Tensor& mask_) {
  const auto s = check_masked_member_mse(kOp, pred_, target_, mask_);
  const auto pred = pred_.contiguous(), target = target_.contiguous(), mask = mask_.contiguous();
  auto per_example = at::empty({s.members, s.batch}, pred.options());
  auto per_member = at::empty({s.members}, pred.options());
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "masked_member_mse", [&] {
    squared_error_rows(pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), s,
                       per_example.mutable_data_ptr<scalar_t>());
    reduce_members(per_example.const_data_ptr<scalar_t>(), mask.const_data_ptr<scalar_t>(),
                   s.members, s.batch, per_member.mutable_data_ptr<scalar_t>());
  });
  return {per_example, per_member};
}

at::Tensor backward_cpu(const at::Tensor& grad_example_, const at::Tensor& grad_member_,
                        const at::Tensor& pred_, const at::Tensor& target_,
                        const at::Tensor& mask_) {
  constexpr const char* op = "masked_member_mse_backward";
  const auto s = check_masked_member_mse(op, pred_, target_, mask_);
  check_masked_member_mse_grads(op, s, grad_example_, grad_member_, pred_);
  const auto pred = pred_.contiguous(), target = target_.contiguous(), mask = mask_.contiguous();
  const auto grad_example = grad_example_.contiguous(), grad_member = grad_member_.contiguous();
  auto grad_pred = at::empty(pred.sizes(), pred.options());
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "masked_member_mse_backward", [&] {
    fused_backward(grad_example.const_data_ptr<scalar_t>(), grad_member.const_data_ptr<scalar_t>(),
                   pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
                   mask.const_data_ptr<scalar_t>(), s, grad_pred.mutable_data_ptr<scalar_t>());
  });
  return grad_pred;
}

}  // namespace

TORCH_LIBRARY_IMPL(ensattr_fast, CPU, m) {
  m.impl("masked_member_mse", &forward_cpu);
  m.impl("masked_member_mse_backward", &backward_cpu);
}

}  // namespace ensattr_fast
