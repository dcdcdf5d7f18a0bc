"""Co-distillation's teacher bank on the server: each client's latest admitted model, by
client key, and the teachers a client is sent at an exchange (up to
``codistill-teachers`` of the others', drawn with the round's seed). Pure data; it goes
into the checkpoint, so a resumed run forwards what the interrupted one would have.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.algorithms.codistill import TEACHER
from server.aggregate import State


class TeacherBank:
    """The latest checked model of every client that uploaded one."""

    def __init__(self) -> None:
        self.models: dict[int, State] = {}

    def keep(self, key: int, state: State) -> None:
        """Client ``key``'s newest model (already admitted: template and finite)."""
        self.models[int(key)] = {k: np.array(v, copy=True) for k, v in state.items()}

    def pick(self, key: int | None, k: int, seed: int) -> dict[str, ArrayRecord]:
        """Up to ``k`` other clients' latest models as ``teacher-1`` … records: all of them
        if there are at most ``k``, else ``k`` drawn with ``seed`` (in key order first)."""
        others = sorted(c for c in self.models if c != key)
        if len(others) > k:
            others = sorted(random.Random(seed).sample(others, k))
        return {TEACHER.format(i): ArrayRecord({n: Array(v) for n, v in self.models[c].items()})
                for i, c in enumerate(others, start=1)}

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """For the checkpoint: plain tensors by client key (loads with weights_only)."""
        return {str(c): {n: torch.from_numpy(np.asarray(v)) for n, v in m.items()}
                for c, m in self.models.items()}

    def restore(self, saved: dict[str, dict[str, torch.Tensor]]) -> None:
        """What :meth:`state` wrote."""
        self.models = {int(c): {n: t.numpy() for n, t in m.items()} for c, m in saved.items()}
