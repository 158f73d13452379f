// Argument checks shared by the CPU and CUDA kernels, so that both devices
// reject bad input with the same message. Each message names the op, the
// argument, what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <optional>
#include <vector>

namespace ensattr_fast {

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must have rank ", rank, ", got shape ", t.sizes());
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                       int64_t expected, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must equal ", what, " = ",
              expected, ", got shape ", t.sizes());
}

inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but the other inputs are on ", like.device());
}

// float32/float64 everywhere; float16/bfloat16 only on CUDA (fp32 accumulation).
inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  const bool full = st == at::kFloat || st == at::kDouble;
  const bool half = st == at::kHalf || st == at::kBFloat16;
  TORCH_CHECK(full || (half && t.is_cuda()), op, ": ", name,
              " must be float32 or float64 (float16/bfloat16 on CUDA only), got ", st, " on ",
              t.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must have dtype ", expected, ", got ",
              t.scalar_type());
}

// The dtype in which an op accumulates and returns statistics of `st`.
inline at::ScalarType accumulate_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

struct MseShape {
  int64_t members, batch, dim;
  bool broadcast_target;  // target [B,D] shared by all members
};

inline MseShape check_masked_member_mse(const char* op, const at::Tensor& pred,
                                        const at::Tensor& target, const at::Tensor& mask) {
  check_rank(op, "pred", pred, 3);
  check_float(op, "pred", pred);
  const int64_t M = pred.size(0), B = pred.size(1), D = pred.size(2);
  TORCH_CHECK(target.dim() == 3 || target.dim() == 2, op,
              ": target must have shape [M,B,D] or [B,D], got shape ", target.sizes());
  const bool broadcast = target.dim() == 2;
  TORCH_CHECK(target.sizes() == (broadcast ? pred.sizes().slice(1) : pred.sizes()), op,
              ": target shape ", target.sizes(), " does not match pred shape ", pred.sizes(),
              " (expected [M,B,D] or [B,D])");
  check_rank(op, "mask", mask, 2);
  TORCH_CHECK(mask.size(0) == M && mask.size(1) == B, op, ": mask must have shape [M,B] = [", M,
              ", ", B, "], got shape ", mask.sizes());
  check_device(op, "target", target, pred);
  check_device(op, "mask", mask, pred);
  check_dtype(op, "target", target, pred.scalar_type());
  // The mask's weights (1/3, per-example weights) enter an fp32 sum: in bf16 they would keep
  // three digits, so half inputs take a float32 mask.
  check_dtype(op, "mask", mask, accumulate_type(pred.scalar_type()));
  return {M, B, D, broadcast};
}

inline void check_masked_member_mse_grads(const char* op, const MseShape& s,
                                          const at::Tensor& grad_per_example,
                                          const at::Tensor& grad_per_member,
                                          const at::Tensor& pred) {
  const auto acc = accumulate_type(pred.scalar_type());
  check_rank(op, "grad_per_example", grad_per_example, 2);
  TORCH_CHECK(grad_per_example.size(0) == s.members && grad_per_example.size(1) == s.batch, op,
              ": grad_per_example must have shape [M,B] = [", s.members, ", ", s.batch,
              "], got shape ", grad_per_example.sizes());
  check_rank(op, "grad_per_member", grad_per_member, 1);
  check_size(op, "grad_per_member", grad_per_member, 0, s.members, "M");
  check_device(op, "grad_per_example", grad_per_example, pred);
  check_device(op, "grad_per_member", grad_per_member, pred);
  check_dtype(op, "grad_per_example", grad_per_example, acc);
  check_dtype(op, "grad_per_member", grad_per_member, acc);
}

struct StepShape {
  int64_t packed, trajectories, dim, entries, noise_rows;
  bool has_noise, has_sample_of;
};

inline StepShape check_ensemble_step(const char* op, const at::Tensor& member_eps,
                                     const at::Tensor& x, const std::optional<at::Tensor>& noise,
                                     const std::optional<at::Tensor>& sample_of,
                                     const at::Tensor& row_ptr, const at::Tensor& rows,
                                     const at::Tensor& weights, bool write_packed) {
  check_rank(op, "x", x, 2);
  check_float(op, "x", x);
  const int64_t T = x.size(0), D = x.size(1);
  check_rank(op, "member_eps", member_eps, 2);
  check_size(op, "member_eps", member_eps, 1, D, "D of x");
  check_device(op, "member_eps", member_eps, x);
  check_dtype(op, "member_eps", member_eps, x.scalar_type());

  check_rank(op, "row_ptr", row_ptr, 1);
  check_size(op, "row_ptr", row_ptr, 0, T + 1, "T + 1");
  check_rank(op, "rows", rows, 1);
  check_rank(op, "weights", weights, 1);
  check_size(op, "weights", weights, 0, rows.size(0), "len(rows)");
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"row_ptr", row_ptr}, {"rows", rows}}) {
    check_device(op, name, t, x);
    check_dtype(op, name, t, at::kLong);
  }
  check_device(op, "weights", weights, x);
  check_dtype(op, "weights", weights, accumulate_type(x.scalar_type()));
  if (write_packed) {
    TORCH_CHECK(rows.size(0) == member_eps.size(0), op,
                ": write_packed needs every packed row listed exactly once, but len(rows) = ",
                rows.size(0), " and member_eps has ", member_eps.size(0), " rows");
  }

  int64_t S = 0;
  if (noise.has_value()) {
    check_rank(op, "noise", *noise, 2);
    check_size(op, "noise", *noise, 1, D, "D of x");
    check_device(op, "noise", *noise, x);
    check_dtype(op, "noise", *noise, x.scalar_type());
    S = noise->size(0);
    if (sample_of.has_value()) {
      check_rank(op, "sample_of", *sample_of, 1);
      check_size(op, "sample_of", *sample_of, 0, T, "T of x");
      check_device(op, "sample_of", *sample_of, x);
      check_dtype(op, "sample_of", *sample_of, at::kLong);
    } else {
      TORCH_CHECK(S == T, op, ": without sample_of, noise must have one row per trajectory (", T,
                  "), got shape ", noise->sizes());
    }
  } else {
    TORCH_CHECK(!sample_of.has_value(), op, ": sample_of was given without noise");
  }
  return {member_eps.size(0), T, D, rows.size(0), S, noise.has_value(), sample_of.has_value()};
}

// The CSR's index checks, on host copies of row_ptr, rows and sample_of: O(T + R), against
// the O(R D) of a step. The CPU kernel runs them on every call; on CUDA they would need a
// device-to-host copy (a sync per sampler step), so the CUDA kernel only keeps its memory
// accesses in range and the Python wrapper runs these once per CSR (ops.py).
inline void check_ensemble_step_indices(const char* op, const at::Tensor& row_ptr,
                                        const at::Tensor& rows,
                                        const std::optional<at::Tensor>& sample_of, int64_t packed,
                                        int64_t noise_rows, bool write_packed) {
  const int64_t T = row_ptr.numel() - 1, R = rows.numel();
  TORCH_CHECK(T >= 0, op, ": row_ptr must have T + 1 >= 1 entries, got none");
  for (const auto* t : {&row_ptr, &rows}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->is_contiguous(), op,
                ": the index check takes contiguous int64 CPU tensors");
  }
  const int64_t* ptr = row_ptr.const_data_ptr<int64_t>();
  TORCH_CHECK(ptr[0] == 0, op, ": row_ptr[0] must be 0, got ", ptr[0]);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(ptr[t + 1] >= ptr[t], op, ": row_ptr must be non-decreasing, but row_ptr[", t + 1,
                "] = ", ptr[t + 1], " < row_ptr[", t, "] = ", ptr[t]);
  }
  TORCH_CHECK(ptr[T] == R, op, ": row_ptr[T] must equal len(rows) = ", R, ", got ", ptr[T]);
  const int64_t* r = rows.const_data_ptr<int64_t>();
  std::vector<bool> seen(write_packed ? packed : 0);
  for (int64_t j = 0; j < R; ++j) {
    TORCH_CHECK(r[j] >= 0 && r[j] < packed, op, ": rows[", j, "] = ", r[j],
                " is out of range for member_eps with ", packed, " rows");
    if (write_packed) {
      TORCH_CHECK(!seen[r[j]], op, ": write_packed needs every packed row listed once, but row ",
                  r[j], " appears twice in rows");
      seen[r[j]] = true;
    }
  }
  if (sample_of.has_value()) {
    TORCH_CHECK(sample_of->device().is_cpu() && sample_of->scalar_type() == at::kLong &&
                    sample_of->is_contiguous() && sample_of->numel() == T,
                op, ": the index check takes a contiguous int64 CPU sample_of of length T = ", T);
    const int64_t* so = sample_of->const_data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(so[t] >= 0 && so[t] < noise_rows, op, ": sample_of[", t, "] = ", so[t],
                  " is out of range for noise with ", noise_rows, " rows");
    }
  }
}

struct ScoreShape {
  int64_t rows, units, members, k;  // rows: S samples or Q queries
  bool has_prev;
};

inline ScoreShape check_code_scores(const char* op, const char* stats_name, const at::Tensor& code,
                                    const at::Tensor& stats, int64_t stats_rank, int64_t k,
                                    const std::optional<at::Tensor>& prev_values,
                                    const std::optional<at::Tensor>& prev_indices) {
  check_rank(op, "code", code, 2);
  check_dtype(op, "code", code, at::kByte);
  const int64_t N = code.size(0), M = code.size(1);
  check_rank(op, stats_name, stats, stats_rank);
  check_float(op, stats_name, stats);
  check_device(op, stats_name, stats, code);
  check_size(op, stats_name, stats, 1, M, "M of code");
  if (stats_rank == 3) check_size(op, stats_name, stats, 2, M, "M of code");
  const int64_t S = stats.size(0);
  TORCH_CHECK(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK(prev_values.has_value() == prev_indices.has_value(), op,
              ": prev_values and prev_indices must be given together");
  if (prev_values.has_value()) {
    const auto acc = accumulate_type(stats.scalar_type());
    for (const auto& [name, t, dtype] : {std::tuple<const char*, const at::Tensor&, at::ScalarType>{
                                             "prev_values", *prev_values, acc},
                                         {"prev_indices", *prev_indices, at::kLong}}) {
      check_rank(op, name, t, 2);
      TORCH_CHECK(t.size(0) == S && t.size(1) == k, op, ": ", name, " must have shape [", S, ", ",
                  k, "], got shape ", t.sizes());
      check_device(op, name, t, code);
      check_dtype(op, name, t, dtype);
    }
  }
  return {S, N, M, k, prev_values.has_value()};
}

}  // namespace ensattr_fast
