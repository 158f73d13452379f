// The schema of every ensattr_fast op. Kernels live in cpu/ and cuda/ and are
// registered per dispatch key; nothing here knows about devices.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#ifndef ENSATTR_FAST_CUDA_ARCH_LIST
#define ENSATTR_FAST_CUDA_ARCH_LIST ""
#endif

namespace ensattr_fast {

// What this library was compiled with, as a JSON object, so that the Python
// package can tell the user at run time instead of guessing from the wheel.
static std::string build_info() {
  std::string info = "{";
#ifdef WITH_CUDA
  info += "\"cuda\": true, \"cuda_arch_list\": \"" ENSATTR_FAST_CUDA_ARCH_LIST "\", ";
#else
  info += "\"cuda\": false, \"cuda_arch_list\": \"\", ";
#endif
#ifdef _OPENMP
  info += "\"openmp\": true, ";
#else
  info += "\"openmp\": false, ";
#endif
  info += "\"torch\": \"" + std::to_string(TORCH_VERSION_MAJOR) + "." +
          std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH) + "\", ";
  info += "\"compiler\": \"" __VERSION__ "\"}";
  return info;
}

TORCH_LIBRARY(ensattr_fast, m) {
  m.def("build_info() -> str", &build_info);

  // pred [M,B,D], target [M,B,D] or [B,D], mask [M,B] -> per_example [M,B], per_member [M]
  m.def("masked_member_mse(Tensor pred, Tensor target, Tensor mask) -> (Tensor, Tensor)");
  m.def(
      "masked_member_mse_backward(Tensor grad_per_example, Tensor grad_per_member, "
      "Tensor pred, Tensor target, Tensor mask) -> Tensor");

  // member_eps [P,D], x [T,D], noise [S,D] or None, sample_of [T] or None, CSR row_ptr [T+1],
  // rows [R], weights [R] -> x_next [T,D], eps_bar [T,D], packed_next [P or 0, D]
  m.def(
      "ensemble_step(Tensor member_eps, Tensor x, Tensor? noise, Tensor? sample_of, "
      "Tensor row_ptr, Tensor rows, Tensor weights, float a, float b, float c, float d, "
      "float s, float clip_min, float clip_max, bool write_packed) -> (Tensor, Tensor, Tensor)");
  // The CSR index checks of ensemble_step on CPU tensors (CUDA steps skip them: no sync).
  m.def(
      "ensemble_step_check_indices(Tensor row_ptr, Tensor rows, Tensor? sample_of, int packed, "
      "int noise_rows, bool write_packed) -> ()");

  // code [N,M] uint8 with gram [S,M,M] or losses [Q,M]
  //   -> scores [S,N], top values [S,k], top units [S,k]
  m.def(
      "code_first_order(Tensor code, Tensor gram, int k, int unit_offset, "
      "Tensor? prev_values, Tensor? prev_indices) -> (Tensor, Tensor, Tensor)");
  m.def(
      "code_loss_contrast(Tensor code, Tensor losses, int k, int unit_offset, "
      "Tensor? prev_values, Tensor? prev_indices) -> (Tensor, Tensor, Tensor)");
}

}  // namespace ensattr_fast
