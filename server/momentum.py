"""Server momentum (FedAvgM, Hsu et al. 2019): the server treats the round's change of the
meme as a gradient and steps with momentum, so a meme averaged over clients of very
different data keeps its direction from round to round instead of following each round's
sample.

With ``d = w_sent - w_aggregate`` (the pseudo-gradient), ``v <- mu * v + d`` and
``w_next = w_sent - server_lr * v``. ``server-lr`` = 1 and ``server-momentum`` = 0 give
back the aggregate itself. Integer arrays (BatchNorm's counters) take the aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

State = dict[str, np.ndarray]


def momentum_step(sent: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray],
                  velocity: Mapping[str, np.ndarray], lr: float, momentum: float,
                  ) -> tuple[State, State]:
    """One server step: (the meme to publish, the new velocity). ``velocity`` may lack
    keys (the first round): those start at zero."""
    meme: State = {}
    new_velocity: State = {}
    for k, agg in aggregate.items():
        if agg.dtype.kind != "f":
            meme[k] = agg
            continue
        ref = np.asarray(sent[k], dtype=np.float64)
        v = momentum * velocity[k] if k in velocity else 0.0
        new_velocity[k] = v + (ref - agg.astype(np.float64))
        with np.errstate(over="ignore"):  # an overflow is an Inf the release refuses
            meme[k] = (ref - lr * new_velocity[k]).astype(agg.dtype)
    return meme, new_velocity


class ServerMomentum:
    """The velocity between rounds; saved in the checkpoint so a resumed run steps on as
    the uninterrupted one would."""

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr, self.momentum = lr, momentum
        self.velocity: State = {}

    @property
    def active(self) -> bool:
        """Whether it changes anything: with lr 1 and no momentum the aggregate is the meme."""
        return self.lr != 1.0 or self.momentum != 0.0

    def propose(self, sent: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray],
                ) -> tuple[State, State]:
        """(the meme to publish after a round whose aggregate is ``aggregate``, the velocity
        to :meth:`commit` once that meme is released): a round that is not released leaves
        the velocity as it was."""
        if not self.active:
            return dict(aggregate), self.velocity
        return momentum_step(sent, aggregate, self.velocity, self.lr, self.momentum)

    def commit(self, velocity: State) -> None:
        """Keep the velocity of a released round."""
        self.velocity = velocity

    def state(self) -> dict[str, torch.Tensor]:
        """The velocity as tensors (``torch.load(..., weights_only=True)`` reads them)."""
        return {k: torch.from_numpy(v.copy()) for k, v in self.velocity.items()}

    def restore(self, state: Mapping[str, torch.Tensor], meme: Mapping[str, torch.Tensor],
                ) -> None:
        """Take a checkpoint's velocity back, refusing one that does not fit this meme's
        floating arrays (names and shapes)."""
        for k, v in state.items():
            ref = meme.get(k)
            if (not isinstance(v, torch.Tensor) or ref is None or not ref.is_floating_point()
                    or tuple(v.shape) != tuple(ref.shape)):
                raise ValueError(f"server momentum's velocity '{k}' does not fit the meme "
                                 f"(expected one of its floating arrays, with its shape)")
        self.velocity = {k: v.detach().cpu().numpy().astype(np.float64)
                         for k, v in state.items()}
