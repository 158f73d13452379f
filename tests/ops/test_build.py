"""The build: what it reports, what a missing library says, and the ops under torch.compile."""

import subprocess
import sys

import torch

import ensattr_fast
from ensattr_fast import _reference
from ensattr_fast.ops import code_scores, ensemble_step, masked_member_mse


def test_build_info_reports_the_registered_kernels():
    info = ensattr_fast.build_info()
    assert set(info) >= {"cuda", "cuda_arch_list", "openmp", "torch", "compiler", "cuda_available"}
    for op in ("masked_member_mse", "ensemble_step", "code_first_order", "code_loss_contrast"):
        name = f"ensattr_fast::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == info["cuda"]
    assert info["torch"] == torch.__version__.split("+")[0]


def test_missing_library_says_how_to_build():
    # Hide the compiled library from every import mechanism (the plain path and an editable
    # install's finder alike), as on a checkout that was never built.
    hide_library = """
import sys

class NoCompiledLibrary:
    def find_spec(self, name, path=None, target=None):
        if name == "ensattr_fast._C":
            raise ImportError("no module named ensattr_fast._C")

sys.meta_path.insert(0, NoCompiledLibrary())
import ensattr_fast
"""
    result = subprocess.run([sys.executable, "-c", hide_library], capture_output=True, text=True)
    assert result.returncode != 0
    assert "compiled library (ensattr_fast._C) could not be loaded" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def test_ops_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 6, generator=g, requires_grad=True)
    target, mask = torch.randn(4, 6, generator=g), torch.rand(3, 4, generator=g)
    x, member_eps = torch.randn(2, 6, generator=g), torch.randn(4, 6, generator=g)
    row_ptr, rows = torch.tensor([0, 2, 4]), torch.tensor([0, 2, 1, 3])
    weights = torch.full((4,), 0.5)
    code = (torch.rand(10, 3, generator=g) < 0.5).to(torch.uint8)
    code[:, 0], code[:, 1] = 0, 1

    def step(pred):
        per_example, per_member = masked_member_mse(pred, target, mask)
        x_next, _, _ = ensemble_step(member_eps, x, row_ptr, rows, weights, coefficients=(1.0, -0.5, 0.9, 0.1, 0.0),
                                     clip=(-1.0, 1.0))
        out = code_scores(code, losses=per_example[:, :2].T.contiguous(), k=3)
        return per_member.sum() + x_next.sum() + out.scores.sum(), out.top_indices

    compiled = torch.compile(step, fullgraph=True)
    got, got_top = compiled(pred)
    (got_grad,) = torch.autograd.grad(got, pred)
    want, want_top = step(pred)
    (want_grad,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    assert torch.equal(got_top, want_top)
    torch.testing.assert_close(
        masked_member_mse(pred, target, mask)[1], _reference.masked_member_mse(pred, target, mask)[1]
    )
