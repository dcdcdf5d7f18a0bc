"""Feature-level distillation (``distill-hidden``): FedKD's hidden-state loss (Wu et al.
2022) among FML's models (the private model, peers 2…K, the meme), beside the logits' KL.

Why: the logits carry one number per class per image; on a client's few hundred images that
is all a private model learns from the meme. The penultimate features (what the classifier
reads) carry the meme's representation itself, as fine-tuning hands it over, without
copying weights. Plain PyTorch: the features are read by a forward pre-hook on each
model's last linear layer, so any architecture whose classifier is its last ``nn.Linear``
takes part unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from common.models import TaskSpec, build_model


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, ce_student: torch.Tensor,
                ce_teacher: torch.Tensor) -> torch.Tensor:
    """MSE(h_student, h_teacher) / max(1, CE_student + CE_teacher): FedKD's adaptive hidden
    loss, bounded.

    The teacher's features and both CEs are detached, so only the student moves; dividing by
    the two models' batch CE makes a pair that still predicts poorly pull less. FedKD divides
    by the CE sum alone, which amplifies without bound once both models fit the batch while
    their features still differ (CE -> 0, MSE does not): our first run diverged so in round
    97. So the division only ever attenuates: at most the plain γ·MSE.
    """
    mse = F.mse_loss(student.float(), teacher.detach().float())
    return mse / (ce_student + ce_teacher).detach().clamp_min(1.0)


def classifier(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (in registration order): the layer whose input is the
    penultimate feature vector."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ConfigError("run-config key 'distill-hidden' reads the input of a model's last "
                          f"linear layer, and {type(model).__name__} has none: expected 0")
    return last


def _refuse_widths(widths: Mapping[str, int]) -> None:
    if len(set(widths.values())) > 1:
        raise ConfigError("run-config key 'distill-hidden' matches penultimate features, "
                          "which need one width in every model; here "
                          + ", ".join(f"{k}: {w}" for k, w in widths.items())
                          + ": expected 0, or models of one feature width")


def check_widths(architectures: Iterable[str], spec: TaskSpec) -> None:
    """Refuse, before any round, architectures of different feature widths (the server
    checks what the run config names: ``meme-model``, ``local-model``, ``local-models``,
    ``peer-models``; a node's own ``local-model`` is checked when it first trains)."""
    _refuse_widths({name: classifier(build_model(name, spec)).in_features
                    for name in dict.fromkeys(architectures)})


class FeatureTap:
    """The penultimate features of each model's latest forward pass, by slot name.

    Registers a forward pre-hook on each model's :func:`classifier`; :meth:`close` removes
    them. Every model's features must have one width (FedKD would learn a projection
    between widths; here a mismatch is refused, naming the key and the widths).
    """

    def __init__(self, models: Mapping[str, nn.Module]) -> None:
        heads = {k: classifier(m) for k, m in models.items()}
        _refuse_widths({k: h.in_features for k, h in heads.items()})
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [h.register_forward_pre_hook(self._hook(k)) for k, h in heads.items()]

    def _hook(self, name: str):
        def store(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.features[name] = args[0]
        return store

    def close(self) -> None:
        """Remove the hooks (the models are as they were)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.features.clear()


def hidden_terms(features: Mapping[str, torch.Tensor], logits: Mapping[str, torch.Tensor],
                 y: torch.Tensor, weight: float, students: Sequence[str],
                 ) -> dict[str, torch.Tensor]:
    """Per student s: weight · mean over the other models t of :func:`hidden_loss`
    (h_s, h_t). Only ``students`` learn (FML passes the models whose α or β is below 1: a
    private model in its warm-up, or any model at α or β = 1, gets no hidden term, as it
    gets no KL); a model whose features or logits are not finite is nobody's teacher (as in
    the KL)."""
    ce = {k: F.cross_entropy(v, y) for k, v in logits.items()}
    finite = {k: bool(features[k].isfinite().all()) and bool(logits[k].isfinite().all())
              for k in features}
    out = {}
    for s in students:
        teachers = [t for t in features if t != s and finite[t]]
        if teachers:
            out[s] = weight * sum(hidden_loss(features[s], features[t], ce[s], ce[t])
                                  for t in teachers) / len(teachers)
    return out
