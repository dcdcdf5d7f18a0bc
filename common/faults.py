"""Injected faults for robustness experiments: a client that raises, sends NaN, sends a
scaled (poisoned) update, forges its arrays' bytes, or is a straggler. Set with the
run-config key ``faults``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config parses faults without importing numpy
    import numpy as np


@dataclass(frozen=True)
class Fault:
    """An injected fault for robustness experiments: what a simulated client does wrong."""

    kind: str  # "raise", "nan", "scale", "forge" or "slow"
    partition_id: int
    round: int | None = None  # None: every round
    factor: float = 1.0  # for "scale": meme = global + factor * (meme - global)
    seconds: float = 0.0  # for "slow": extra time before training (a straggler)

    def applies(self, partition_id: int | None, server_round: int) -> bool:
        """Whether this fault hits that client in that round."""
        return partition_id == self.partition_id and self.round in (None, server_round)


def parse_faults(spec: str) -> tuple[Fault, ...]:
    """``"raise:1@2, nan:2, scale100:3, forge:1, slow30:0@4"`` -> faults; ValueError on
    anything else (``scale`` and ``slow`` need their number)."""
    faults = []
    for item in filter(None, (i.strip() for i in spec.split(","))):
        kind, _, target = item.partition(":")
        pid, _, rnd = target.partition("@")
        factor, seconds = 1.0, 0.0
        try:  # the number is part of the kind: scale100, slow30
            if kind.startswith("scale"):
                factor, kind = float(kind[5:]), "scale"
            elif kind.startswith("slow"):
                seconds, kind = float(kind[4:]), "slow"
        except ValueError:
            raise ValueError(item) from None
        if (kind not in ("raise", "nan", "scale", "forge", "slow") or not pid.isdigit()
                or (rnd and not rnd.isdigit()) or not 0 <= seconds < float("inf")):
            raise ValueError(item)
        faults.append(Fault(kind, int(pid), int(rnd) if rnd else None, factor, seconds))
    return tuple(faults)


def apply_to_update(fault: Fault, trained: Mapping[str, np.ndarray],
                    received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The meme a faulty client sends instead of ``trained`` (``received`` is the global)."""
    if fault.kind not in ("nan", "scale"):
        return dict(trained)
    out = {}
    for k, v in trained.items():
        if v.dtype.kind != "f":  # counters stay as they are
            out[k] = v
        elif fault.kind == "nan":
            out[k] = v * float("nan")  # NaN everywhere (NaN·x is NaN, also for inf)
        else:  # scale
            out[k] = (received[k] + fault.factor * (v - received[k])).astype(v.dtype)
    return out
