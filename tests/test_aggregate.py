"""Every aggregation rule against results computed by hand (FedLab's style: one small case
each, chosen so that the rules disagree)."""

import numpy as np
import pytest

from common.options import Aggregation
from server.aggregate import (
    aggregate,
    krum,
    krum_select,
    median,
    multi_krum,
    trimmed_mean,
    uniform,
    weighted,
)


def _points(*values, counter=None):
    """One meme per value: a float vector filled with it and an integer counter."""
    return [{"w": np.full(2, v, np.float32),
             "n": np.array(v if counter is None else counter, np.int64)} for v in values]


def test_weighted_average_hand_computed():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "n": np.array(3, dtype=np.int64)}
    b = {"w": np.array([4.0, 8.0], dtype=np.float32), "n": np.array(6, dtype=np.int64)}
    out = weighted([a, b], [1, 2])  # (1*a + 2*b) / 3
    np.testing.assert_allclose(out["w"], [3.0, 6.0])
    assert out["w"].dtype == np.float32
    assert isinstance(out["n"], np.ndarray) and out["n"].dtype == np.int64 and int(out["n"]) == 5


def test_uniform_is_the_plain_mean():
    states = [{"w": np.full((2, 2), v, dtype=np.float32)} for v in (1.0, 2.0, 6.0)]
    np.testing.assert_allclose(uniform(states)["w"], np.full((2, 2), 3.0))


@pytest.mark.parametrize("weights", [[0, 0], [1, -1], [1, float("nan")], [1]])
def test_bad_weights_refused(weights):
    states = [{"w": np.zeros(1)}, {"w": np.ones(1)}]
    with pytest.raises(ValueError):
        weighted(states, weights)


def test_median_odd_and_even_and_integer_rounding():
    out = median(_points(1.0, 2.0, 10.0))
    np.testing.assert_array_equal(out["w"], [2.0, 2.0])
    out = median(_points(1.0, 2.0, 3.0, 10.0))  # even: the mean of the two middle ones
    np.testing.assert_array_equal(out["w"], [2.5, 2.5])
    assert out["n"].dtype == np.int64 and int(out["n"]) == 2  # rint(2.5) = 2 (to even)


def test_trimmed_mean_cuts_beta_on_each_side():
    out = trimmed_mean(_points(1.0, 2.0, 3.0, 4.0, 100.0), 0.2)  # one cut per side
    np.testing.assert_allclose(out["w"], [3.0, 3.0])  # mean of 2, 3, 4
    assert out["w"].dtype == np.float32


# x = 0, 1, 2, 4, 20 on both coordinates, f = 1: each meme's score sums the squared distance
# (over 2 coordinates, so twice the 1-D one) to its n - f - 2 = 2 nearest others:
# 0: 2*(1+4)=10, 1: 2*(1+1)=4, 2: 2*(1+4)=10, 4: 2*(4+9)=26, 20: 2*(256+324)=1160
KRUM_POINTS = (0.0, 1.0, 2.0, 4.0, 20.0)


def test_krum_selects_by_hand_computed_scores():
    states = _points(*KRUM_POINTS)
    order = krum_select(states, num_malicious=1, num_select=4)
    assert order[0] == 1 and set(order) == {0, 1, 2, 3}  # 20 (index 4) never
    np.testing.assert_array_equal(krum(states, [1] * 5, num_malicious=1)["w"], [1.0, 1.0])


def test_multi_krum_averages_the_kept_with_their_weights():
    states = _points(*KRUM_POINTS)
    # keeps n - f = 4: 0, 1, 2, 4 with weights 1, 2, 1, 4 -> (0 + 2 + 2 + 16) / 8 = 2.5
    out = multi_krum(states, [1, 2, 1, 4, 1], num_malicious=1)
    np.testing.assert_allclose(out["w"], [2.5, 2.5])


@pytest.mark.parametrize(("rule", "expected"), [
    (Aggregation.WEIGHTED, (0 * 1 + 1 * 2 + 2 * 1 + 4 * 4 + 20 * 2) / 10),  # 6.0
    (Aggregation.UNIFORM, 27 / 5),  # 5.4
    (Aggregation.MEDIAN, 2.0),
    (Aggregation.TRIMMED_MEAN, (1 + 2 + 4) / 3),  # beta 0.2: one cut per side
    (Aggregation.KRUM, 1.0),
    (Aggregation.MULTI_KRUM, (0 * 1 + 1 * 2 + 2 * 1 + 4 * 4) / 8),  # 2.5
])
def test_the_enum_chooses_the_rule(rule, expected):
    out = aggregate(rule, _points(*KRUM_POINTS), [1, 2, 1, 4, 2], trimmed_mean_beta=0.2,
                    num_malicious=1)
    np.testing.assert_allclose(out["w"], [expected, expected], rtol=1e-6)
