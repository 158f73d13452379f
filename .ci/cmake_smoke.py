"""Load the CMake-built library on its own and check each op against the reference.

Usage: python .ci/cmake_smoke.py build/libensattr_fast.so
The package's own extension is not imported: both would register the same op namespace.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch

torch.ops.load_library(sys.argv[1])
spec = importlib.util.spec_from_file_location(
    "reference", Path(__file__).resolve().parents[1] / "ensattr_fast" / "_reference.py"
)
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)
ops = torch.ops.ensattr_fast

g = torch.Generator().manual_seed(0)
pred, target, mask = torch.randn(4, 8, 33, generator=g), torch.randn(8, 33, generator=g), torch.rand(4, 8, generator=g)
for got, want in zip(ops.masked_member_mse(pred, target, mask), reference.masked_member_mse(pred, target, mask)):
    torch.testing.assert_close(got, want)

x, member_eps = torch.randn(3, 10, generator=g), torch.randn(5, 10, generator=g)
noise, sample_of = torch.randn(2, 10, generator=g), torch.tensor([0, 1, 1])
row_ptr, rows, weights = torch.tensor([0, 2, 3, 5]), torch.tensor([4, 0, 2, 1, 3]), torch.rand(5, generator=g)
args = (member_eps, x, noise, sample_of, row_ptr, rows, weights, 1.1, -0.3, 0.9, 0.1, 0.2, -1.0, 1.0, True)
for got, want in zip(ops.ensemble_step(*args), reference.ensemble_step(*args)):
    torch.testing.assert_close(got, want)

code = (torch.rand(50, 6, generator=g) < 0.5).to(torch.uint8)
gram = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
gram = gram @ gram.transpose(1, 2)
losses = torch.rand(3, 6, generator=g, dtype=torch.float64)
for op, ref, stats in ((ops.code_first_order, reference.code_first_order, gram),
                       (ops.code_loss_contrast, reference.code_loss_contrast, losses)):
    got, want = op(code, stats, 4, 0, None, None), ref(code, stats, 4, 0, None, None)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    assert torch.equal(got[2], want[2])

print("CMake build OK:", json.loads(ops.build_info()))
