"""Pure aggregation of meme state_dicts: no Flower, no I/O, unit-tested by hand."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def weighted_average(states: Sequence[dict[str, np.ndarray]],
                     weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Σ w_i·x_i / Σ w_i per key, accumulated in float64, returned in each key's dtype.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are rounded back to integers,
    so the result loads into the model exactly like a client's own state_dict.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {weights}")
    w = w / w.sum()
    out: dict[str, np.ndarray] = {}
    for key, ref in states[0].items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for state, wi in zip(states, w, strict=True):
            acc += wi * state[key].astype(np.float64)
        if np.issubdtype(ref.dtype, np.integer):
            acc = np.rint(acc)
        out[key] = np.asarray(acc, dtype=np.float64).astype(ref.dtype)
    return out
