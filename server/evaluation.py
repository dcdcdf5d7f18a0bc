"""The evaluation half of a round, as small pure steps: each reply checked against what
its node reported when identified, its row of ``clients.json``, and the sample-weighted
means the round records (also of the train replies' losses)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import RecordDict

from common.algorithms.base import PEER_SCORED, SCORED
from server.validate import Evaluation, Rejected, Update, admit_evaluation

#: every evaluation score, by model (:data:`SCORED`)
SCORES = tuple(f"{name}-{what}" for name in (*SCORED, *PEER_SCORED)
               for what in ("accuracy", "loss"))


def admit_client_evaluation(content: RecordDict, info: Mapping[str, Any]) -> Evaluation:
    """The checked evaluation reply (:func:`admit_evaluation`), its ``num-examples`` no
    larger than the test split the node reported when identified (``info``), or
    :class:`Rejected`. A client without test data is admitted with 0 examples."""
    got = admit_evaluation(content)
    if "num-test" in info and got.num_examples > int(info["num-test"]):
        raise Rejected(f"'num-examples' = {got.num_examples} exceeds the "
                       f"{int(info['num-test'])} test examples the node reported")
    return got


def client_row(key: int, got: Evaluation, info: Mapping[str, Any]) -> dict[str, Any]:
    """A client's entry in ``clients.json`` for this round."""
    return {"key": key, "num_test": got.num_examples, "num_train": info.get("num-train"),
            **{k.replace("-", "_"): got.metrics.get(k) for k in (*SCORES, "mix-weight")},
            "peer_accuracies": peer_accuracies(got.metrics)}


def peer_accuracies(scores: Mapping[str, float]) -> dict[str, float] | None:
    """Each of peers 2…K's own accuracy (``private-peers`` > 1), by slot; else None."""
    return {name: scores[f"{name}-accuracy"] for name in PEER_SCORED
            if f"{name}-accuracy" in scores} or None


def weighted_means(replies: Sequence[Update | Evaluation], keys: Iterable[str],
                   ) -> dict[str, float]:
    """Each key's mean over the replies that carry it, weighted by their sample counts."""
    out = {}
    for key in keys:
        pairs = [(getattr(r, "weight", None) or getattr(r, "num_examples", 0), r.metrics[key])
                 for r in replies if key in r.metrics]
        total = sum(w for w, _ in pairs)
        if total > 0:
            out[key] = float(sum(w * v for w, v in pairs) / total)
    return out
