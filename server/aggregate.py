"""Every aggregation rule of the meme, as a small pure function of the clients' memes.

A meme is a ``dict[str, np.ndarray]`` (its state_dict as numpy). Each rule returns the
aggregate in each key's own dtype (integer buffers such as BatchNorm's
``num_batches_tracked`` rounded back to integers), so it loads into the model like a
client's own state_dict. :func:`aggregate` chooses the rule by the run-config enum; the
robust rules are Flower's (FedMedian's median, FedTrimmedAvg's ``trim_mean``, Krum's
``select_multikrum``), applied here to plain arrays. No Flower messages, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from common.compression import State
from common.options import Aggregation


def as_dtypes(values: Mapping[str, np.ndarray], dtypes: Mapping[str, np.dtype]) -> State:
    """Each array in its key's dtype; integer ones rounded, not truncated."""
    out = {}
    for k, v in values.items():
        dtype = np.dtype(dtypes[k])
        v = np.asarray(v)
        out[k] = np.asarray(np.rint(v) if np.issubdtype(dtype, np.integer) else v).astype(dtype)
    return out


def _dtypes(state: State) -> dict[str, np.dtype]:
    return {k: v.dtype for k, v in state.items()}


def _check(states: Sequence[State]) -> None:
    if not states:
        raise ValueError("aggregation needs at least one meme")


def weighted(states: Sequence[State], weights: Sequence[float]) -> State:
    """Σ w_i·x_i / Σ w_i per key, accumulated in float64 (FedAvg)."""
    _check(states)
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {weights}")
    w = w / w.sum()
    out = {}
    for key, ref in states[0].items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for state, wi in zip(states, w, strict=True):
            acc += wi * state[key].astype(np.float64)
        out[key] = acc
    return as_dtypes(out, _dtypes(states[0]))


def uniform(states: Sequence[State]) -> State:
    """The plain mean: every client counts the same (the FML paper's averaging)."""
    return weighted(states, [1.0] * len(states))


def median(states: Sequence[State]) -> State:
    """Coordinate-wise median (Flower's FedMedian)."""
    _check(states)
    return as_dtypes({k: np.median(np.stack([s[k] for s in states]), axis=0)
                       for k in states[0]}, _dtypes(states[0]))


def trimmed_mean(states: Sequence[State], beta: float) -> State:
    """Coordinate-wise mean after cutting the ``beta`` share on each side (FedTrimmedAvg)."""
    _check(states)
    return as_dtypes({k: trim_mean(np.stack([s[k] for s in states]), beta)
                       for k in states[0]}, _dtypes(states[0]))


def krum_select(states: Sequence[State], num_malicious: int, num_select: int) -> list[int]:
    """The indices of the ``num_select`` memes with the lowest Krum score (the summed squared
    distance to their n - f - 2 nearest others), best first: Flower's ``select_multikrum``."""
    _check(states)
    contents = [RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v))
                                                   for k, v in s.items()}),
                            "index": ArrayRecord({"i": Array(np.array([i]))})})
                for i, s in enumerate(states)]
    # Flower takes the first ArrayRecord as the meme: "arrays" was inserted first
    chosen = select_multikrum(contents, num_malicious_nodes=num_malicious,
                              num_nodes_to_select=num_select)
    return [int(c["index"]["i"].numpy()[0]) for c in chosen]


def krum(states: Sequence[State], weights: Sequence[float], num_malicious: int) -> State:
    """The one meme Krum scores best (Blanchard et al. 2017)."""
    best = krum_select(states, num_malicious, 1)[0]
    return weighted([states[best]], [weights[best]])


def multi_krum(states: Sequence[State], weights: Sequence[float], num_malicious: int,
               ) -> State:
    """The n - f memes Krum scores best, averaged with their weights (Multi-Krum)."""
    keep = krum_select(states, num_malicious, max(1, len(states) - num_malicious))
    return weighted([states[i] for i in keep], [weights[i] for i in keep])


def aggregate(rule: Aggregation, states: Sequence[State], weights: Sequence[float], *,
              trimmed_mean_beta: float = 0.2, num_malicious: int = 1) -> State:
    """The rule the run config names, applied to the accepted memes (in client-key order).

    ``weights`` are the clients' ``num-examples`` (capped by validation); only
    ``weighted``, ``krum`` and ``multi-krum`` use them.
    """
    rules: dict[Aggregation, Callable[[], State]] = {
        Aggregation.WEIGHTED: lambda: weighted(states, weights),
        Aggregation.UNIFORM: lambda: uniform(states),
        Aggregation.MEDIAN: lambda: median(states),
        Aggregation.TRIMMED_MEAN: lambda: trimmed_mean(states, trimmed_mean_beta),
        Aggregation.KRUM: lambda: krum(states, weights, num_malicious),
        Aggregation.MULTI_KRUM: lambda: multi_krum(states, weights, num_malicious),
    }
    return rules[rule]()
