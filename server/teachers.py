"""Co-distillation's teacher bank on the server: each client's latest admitted model, by
client key, and the teachers a client is sent at an exchange (up to
``codistill-teachers`` of the others', drawn with the round's seed). The models go into the
checkpoint, so a resumed run forwards what the interrupted one would have; whom it has
served does not (a resumed client's kept teachers went with the old process).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.algorithms.codistill import TEACHER
from common.config import Config
from common.runtime import derive_seed
from server.aggregate import State


class TeacherBank:
    """The latest checked model of every client that uploaded one (``models``, kept in
    the checkpoint), and the exchange whose teachers each client last got (``served``,
    not kept: a resumed run serves every client again)."""

    def __init__(self) -> None:
        self.models: dict[int, State] = {}
        self.served: dict[int, int] = {}  # client key -> the exchange whose teachers it got

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

    def serve(self, cfg: Config, server_round: int, nodes: dict[int, int],
              ) -> dict[int, dict[str, ArrayRecord]]:
        """The teachers due to the sampled ``nodes`` (node id -> client key) this round:
        each that has not yet received the latest exchange's teachers from this server gets
        them (others' latest models, drawn with that exchange's seed): at the exchange
        itself, and later for a client that was not sampled then or whose run was resumed
        since. Between exchanges the bank does not change (models go up only in the round
        before one), so a late client gets what it would have got."""
        spec = cfg.algorithm.spec
        exchange = next((r for r in range(server_round, 0, -1) if spec.teachers(cfg, r)),
                        None)
        if exchange is None:
            return {}
        out = {}
        for node, key in nodes.items():
            if self.served.get(key) == exchange:
                continue
            picked = self.pick(key, spec.teachers(cfg, exchange),
                               derive_seed(cfg.seed, "teachers", exchange, key))
            if picked:
                out[node], self.served[key] = picked, exchange
        return out

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """For the checkpoint: plain tensors by client key (loads with weights_only)."""
        return {str(c): {n: torch.from_numpy(np.asarray(v)) for n, v in m.items()}
                for c, m in self.models.items()}

    def restore(self, saved: dict[str, dict[str, torch.Tensor]]) -> None:
        """What :meth:`state` wrote."""
        self.models = {int(c): {n: t.numpy() for n, t in m.items()} for c, m in saved.items()}
