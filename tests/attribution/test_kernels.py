"""TRAK's kernel scores over feature blocks: the same numbers as the whole-matrix form."""

import pytest
import torch

from ensattr_fast.attribution.gradients import combine, member_scores
from ensattr_fast.attribution.kernels import TrainFeatures, combined, kernel_sums, kernel_weights


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("how", ["mean", "includers", "contrast"])
def test_block_scores_equal_the_whole_kernel(rows, how):
    g = torch.Generator().manual_seed(rows)
    M, n, d, Q, N = 5, 120, 16, 3, 40
    train = torch.randn(M, n, d, generator=g)
    queries = torch.randn(M, Q, d, generator=g)
    unit_of = torch.randint(0, N, (n,), generator=g)
    code = (torch.rand(N, M, generator=g) < 0.5).to(torch.uint8)
    code[0] = 0  # a unit no member saw, and one every member saw
    code[1] = 1
    features = TrainFeatures.in_memory(train, rows)
    torch.testing.assert_close(features.gram, train.double().transpose(1, 2) @ train.double())
    sums = kernel_sums(features.blocks(), kernel_weights(features.gram, queries), unit_of, code)
    expected = combine(member_scores(train, queries, unit_of, N), code, how)
    torch.testing.assert_close(combined(*sums, code, how), expected, rtol=1e-4, atol=1e-5)


def test_the_damping_follows_each_members_gram():
    """lambda_m is a fraction of member m's own mean diagonal: scaling one member's features
    scales its scores by the inverse, as the whole-matrix form does."""
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(2, 50, 8, generator=g), torch.randn(2, 2, 8, generator=g)
    train[1] *= 10
    weights = kernel_weights(TrainFeatures.in_memory(train).gram, queries)
    for m in range(2):
        expected = member_scores(train[m:m + 1], queries[m:m + 1], torch.arange(50), 50)[0]
        torch.testing.assert_close((train[m].double() @ weights[m]).float().T, expected, rtol=1e-4, atol=1e-6)
