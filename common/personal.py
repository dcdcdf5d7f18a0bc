"""FML's personalised prediction other than the private model (``personal-model``): the
received meme tuned on the client's data by the mutual loss, and the weight that mixes it
with the private model, chosen on a slice of the training split held out of training.

Why: a private model learns from the meme only through its logits on the client's few
images, while fine-tuning hands over the meme's features (FedAvg+FT, Matsuda et al. 2022);
which of the two serves a client best depends on how much data it has, so each client
chooses on data it did not train on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from common.training import make_optimizer, train_epochs

if TYPE_CHECKING:
    from common.algorithms.base import Algorithm, Evaluation


def tune_meme(algorithm: Algorithm, private: nn.Module, meme: nn.Module, ev: Evaluation,
              ) -> nn.Module:
    """A copy of the received meme after ``finetune-epochs`` of the algorithm's meme loss
    on the client's training split (held-out slice excluded), the private model teaching
    as a frozen model: neither it nor the received meme changes."""
    torch.manual_seed(ev.seed)  # whatever the tuning draws is this client's and round's
    tuned = copy.deepcopy(meme)
    hp = algorithm.hyper(ev.cfg, {}, node_round=ev.cfg.warmup_rounds)
    hp.epochs = ev.cfg.finetune_epochs
    train_epochs({"local": private, "meme": tuned}, {"meme": make_optimizer(tuned, ev.cfg)},
                 algorithm, ev.x_train, ev.y_train, hp,
                 torch.Generator().manual_seed(ev.seed), ev.device)
    return tuned


@torch.no_grad()
def _probabilities(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([F.softmax(model(x[i:i + 512].to(device)), 1)
                      for i in range(0, len(x), 512)]).cpu()


def validation_weight(private: nn.Module, tuned: nn.Module, ev: Evaluation,
                      grid: Sequence[float]) -> float:
    """The w of ``grid`` whose mixture w·p_private + (1-w)·p_tuned has the lowest mean
    cross-entropy on the held-out slice (log-loss: smoother than accuracy on a few dozen
    images); ties go to the larger w (the private model); no slice: 1, the private."""
    if ev.x_val is None or len(ev.y_val) == 0:
        return 1.0
    p_private = _probabilities(private, ev.x_val, ev.device)
    p_tuned = _probabilities(tuned, ev.x_val, ev.device)
    y = ev.y_val.cpu()
    losses = {w: F.nll_loss((w * p_private + (1 - w) * p_tuned).clamp_min(1e-12).log(),
                            y).item() for w in grid}
    return min(sorted(grid, reverse=True), key=lambda w: losses[w])


class Mixture(nn.Module):
    """w·softmax(a) + (1-w)·softmax(b), returned as log-probabilities (logits whose
    softmax is the mixture, so cross-entropy and argmax score it as they are)."""

    def __init__(self, a: nn.Module, b: nn.Module, weight: float) -> None:
        super().__init__()
        self.a, self.b, self.weight = a, b, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        p = self.weight * F.softmax(self.a(x), 1) + (1 - self.weight) * F.softmax(self.b(x), 1)
        return p.clamp_min(1e-12).log()

