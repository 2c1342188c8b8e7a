"""The consistency sampler's level search (training/distill.py): greedy, then coordinate descent, on an objective
averaged over seeds; and the fast sliced W2 it measures with."""

import numpy as np
import pytest

from training.distances import SlicedW2To, sliced_w2
from training.distill import coordinate_levels, greedy_levels, search_levels


def trap(full: dict[int, list[int]]):
    """An objective whose best k-level setting is full[k], squared distance: what greedy search sees at each
    length leads it away from the best 4-level setting (its second level is the best 2-level one's)."""

    def objective(levels):
        target = full[len(levels)]
        return float(sum((a - b) ** 2 for a, b in zip(levels, target, strict=True)))

    return objective


FULL = {2: [39, 4], 3: [39, 4, 2], 4: [39, 10, 5, 2]}


def test_greedy_search_keeps_the_shorter_samplers_levels():
    assert greedy_levels(trap(FULL), 4, [39], highest=20) == [39, 4, 2, 1]


def test_coordinate_descent_leaves_the_greedy_trap():
    assert coordinate_levels(trap(FULL), [39, 4, 2, 1], highest=20) == [39, 10, 5, 2]
    assert search_levels(trap(FULL), 40, [2, 4]) == {2: [39, 4], 4: [39, 10, 5, 2]}


def test_later_levels_stay_at_or_below_the_cap():
    far = {2: [39, 30], 3: [39, 30, 25], 4: [39, 30, 25, 20]}
    assert greedy_levels(trap(far), 4, [39], highest=20) == [39, 20, 19, 18]
    assert search_levels(trap(far), 40, [2, 4]) == {2: [39, 20], 4: [39, 20, 19, 18]}


def test_fast_sliced_w2_is_sliced_w2():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(3000, 2)).astype(np.float32), rng.normal(size=(3000, 2)).astype(np.float32) * 1.1
    assert SlicedW2To(real)(fake) == pytest.approx(sliced_w2(real, fake), rel=1e-12)
    with pytest.raises(ValueError):
        SlicedW2To(real)(fake[:10])
