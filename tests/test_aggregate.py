"""Aggregation against hand-computed results."""

import numpy as np
import pytest

from server.aggregate import weighted_average


def test_weighted_average_hand_computed():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "n": np.array(3, dtype=np.int64)}
    b = {"w": np.array([4.0, 8.0], dtype=np.float32), "n": np.array(6, dtype=np.int64)}
    out = weighted_average([a, b], [1, 2])  # (1*a + 2*b) / 3
    np.testing.assert_allclose(out["w"], [3.0, 6.0])
    assert out["w"].dtype == np.float32
    assert isinstance(out["n"], np.ndarray) and out["n"].dtype == np.int64 and int(out["n"]) == 5


def test_uniform_weights_are_plain_mean():
    states = [{"w": np.full((2, 2), v, dtype=np.float32)} for v in (1.0, 2.0, 6.0)]
    np.testing.assert_allclose(weighted_average(states, [1, 1, 1])["w"], np.full((2, 2), 3.0))


@pytest.mark.parametrize("weights", [[0, 0], [1, -1], [1, float("nan")], [1]])
def test_bad_weights_refused(weights):
    states = [{"w": np.zeros(1)}, {"w": np.ones(1)}]
    with pytest.raises(ValueError):
        weighted_average(states, weights)
