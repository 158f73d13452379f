"""Code designs, validation and statistics."""

import math

import pytest
import torch

from ensattr_fast import codes


@pytest.mark.parametrize("design", [codes.random_constant_weight, codes.balanced_constant_weight])
def test_constant_weight_rows_distinct_and_half(design):
    code = design(500, 12, seed=3)
    assert code.shape == (500, 12) and code.dtype == torch.uint8
    assert (code.sum(1) == 6).all()
    stats = codes.statistics(code)
    assert stats.duplicate_rows == 0 and stats.min_distance >= 2
    codes.validate(code, constant_weight=True)
    assert torch.equal(design(500, 12, seed=3), code)  # the seed replays the design
    assert not torch.equal(design(500, 12, seed=4), code)


def test_balanced_design_beats_the_seed_design():
    random, balanced = (codes.statistics(f(1797, 16, seed=0)) for f in
                        (codes.random_constant_weight, codes.balanced_constant_weight))
    assert balanced.column_load_max - balanced.column_load_min <= 1
    assert random.column_load_max - random.column_load_min > 10
    # no unit is the complement of another: first-order scores could not tell them apart
    assert balanced.min_effective_distance >= 2 and random.min_effective_distance == 0


def test_large_designs_stay_distinct_and_balanced():
    code = codes.balanced_constant_weight(30_000, 20, seed=1)
    stats = codes.statistics(code, max_pairs_units=2_000)
    assert stats.duplicate_rows == 0
    assert stats.column_load_max - stats.column_load_min <= 1


def test_sparse_exclusion_is_leave_one_group_out():
    code = codes.sparse_exclusion(10, 20, excluders_per_group=2)
    assert ((code == 0).sum(1) == 2).all()  # each group excluded by 2 members
    assert ((code == 0).sum(0) == 1).all()  # each member excludes one group only
    codes.validate(code)
    spread = codes.sparse_exclusion(7, 4, excluders_per_group=2)
    assert ((spread == 0).sum(1) == 2).all() and (spread == 0).sum(0).max() <= math.ceil(14 / 4)


def test_plan_picks_the_design_that_fits_the_units():
    many = codes.Units.per_example(400)
    few = codes.Units.from_labels([i % 10 for i in range(400)])
    assert codes.plan(many, 16)[1] == "balanced"
    code, design = codes.plan(few, 20)
    assert design == "sparse" and code.shape == (10, 20)


def test_units_from_labels_names_and_sizes():
    units = codes.Units.from_labels(["b", "a", "b", "c", "10", "2"])
    assert units.names == ("2", "10", "a", "b", "c")
    assert units.unit_of.tolist() == [3, 2, 3, 4, 1, 0]
    assert units.sizes.tolist() == [1, 1, 1, 2, 1]


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: codes.balanced_constant_weight(10, 15), "even number of members"),
        (lambda: codes.random_constant_weight(100, 6), "cannot have distinct rows of weight 3 with 6 members .at most "
                                                       "20.: use at least 10 members"),
        (lambda: codes.validate(torch.tensor([[1, 0], [1, 1]], dtype=torch.uint8)), "unit 1 has no excluder"),
        (lambda: codes.validate(torch.tensor([[1, 0], [0, 0]], dtype=torch.uint8)), "unit 1 is seen by no member"),
        (lambda: codes.validate(torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.uint8), constant_weight=True),
         "unit 1 is seen by 3 members, not M/2 = 2"),
        (lambda: codes.validate(torch.tensor([[2, 0]])), "only 0 and 1"),
        (lambda: codes.sparse_exclusion(3, 4, excluders_per_group=4), "between 1 and M - 1"),
        (lambda: codes.plan(codes.Units.per_example(10), 4, design="bogus"), "unknown design"),
    ],
)
def test_errors_name_the_problem(make, message):
    with pytest.raises(codes.CodeError, match=message):
        make()


def test_duplicates_allowed_when_asked():
    code = codes.random_constant_weight(30, 4, seed=0, allow_duplicates=True)
    assert codes.statistics(code).duplicate_rows > 0
