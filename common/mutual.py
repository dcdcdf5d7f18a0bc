"""The losses of deep mutual learning between the private model and the meme, and every
variant of them (the ``distill-*`` keys), as pure functions of one batch's logits.
Plain PyTorch; the training loop that calls them is ``common/training.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.options import Distill, DistillGate, DistillWeighting

PLAIN = Distill()  # the loss as written: fixed weighting, no gate, no prior


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) per sample; the teacher is detached.

    T² keeps the gradient scale independent of T.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(1)
    return kl * (t * t)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """The batch mean of :func:`kl_per_sample`.

    ``reduction="batchmean"`` is the true KL per sample (``"mean"`` would also divide by
    the number of classes).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def distill_term(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor,
                  temperature: float, distill: Distill) -> torch.Tensor:
    """The batch mean of the (gated) per-sample KL toward ``teacher`` (logits)."""
    if distill.gate is DistillGate.NONE:
        return distillation_kl(student, teacher, temperature)
    return (kl_per_sample(student, teacher, temperature) * _gate(teacher, y, distill)).mean()


def _gate(teacher_logits: torch.Tensor, y: torch.Tensor, distill: Distill) -> torch.Tensor:
    """1 where a sample's KL toward this teacher counts, else 0 (no gradient); only called
    with a gate (``none`` takes the batch-mean KL directly)."""
    if distill.gate is DistillGate.CORRECT:
        return (teacher_logits.detach().argmax(1) == y).float()
    top = F.softmax(teacher_logits.detach(), dim=1).max(1).values  # CONFIDENT
    return (top >= distill.gate_threshold).float()


def label_log_prior(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log of the client's label distribution, add-one smoothed (no class gets -inf)."""
    counts = torch.bincount(y, minlength=num_classes).float() + 1.0
    return (counts / counts.sum()).log()


def seen_log_mask(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0 for the classes in ``y``, -30 for the others (their teacher mass becomes ~1e-13):
    added to the meme's logits it renormalises the teacher over the client's own classes
    without reweighting them (the restricted softmax of FedRS, Li & Zhan 2021)."""
    seen = torch.bincount(y, minlength=num_classes) > 0
    return torch.where(seen, 0.0, -30.0)


def mutual_losses(local_logits: torch.Tensor, meme_logits: torch.Tensor, y: torch.Tensor,
                  alpha: float, beta: float, temperature: float = 1.0,
                  distill: Distill = PLAIN, log_prior: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two FML losses on one batch, and every variant of them.

    L_local = α·CE(local, y) + (1-α)·w·mean_i g_i^meme·KL_i(p_meme ‖ p_local)
    L_meme  = β·CE(meme, y)  + (1-β)·w·mean_i g_i^local·KL_i(p_local ‖ p_meme)

    ``w`` is 1 (``fixed``) or 1 / (CE_local + CE_meme) of the batch, detached
    (``adaptive``: a teacher that is still poor pulls less). ``additive`` keeps w = 1 but
    drops the α (β) in front of the CE: the labels' gradient keeps its full size, as in
    plain training, and the KL is added on top (the convex form halves the label signal at
    α = 0.5, which under plain SGD slows learning like halving the learning rate).
    ``g_i`` gates a sample's KL toward that teacher (``correct``: it predicts y_i;
    ``confident``: its top probability is at least the threshold); every sample keeps its
    CE. With ``log_prior`` (the client's label prior, :func:`label_log_prior`) the meme
    teaches with its logits plus that prior, so it stops pulling the private model toward
    classes the client never sees. Each KL's teacher is detached: L_local's gradient
    reaches only the local model, L_meme's only the meme. With α = β = 1 this is two
    independent cross-entropy losses.
    """
    ce_local = F.cross_entropy(local_logits, y)
    ce_meme = F.cross_entropy(meme_logits, y)
    additive = distill.weighting is DistillWeighting.ADDITIVE
    loss_local = ce_local if additive else alpha * ce_local
    loss_meme = ce_meme if additive else beta * ce_meme
    weight = (1.0 / (ce_local + ce_meme).detach().clamp_min(1e-8)
              if distill.weighting is DistillWeighting.ADAPTIVE else 1.0)
    if alpha < 1:
        teacher = meme_logits if log_prior is None else meme_logits + log_prior
        loss_local = loss_local + (1 - alpha) * weight * distill_term(
            local_logits, teacher, y, temperature, distill)
    if beta < 1:
        loss_meme = loss_meme + (1 - beta) * weight * distill_term(
            meme_logits, local_logits, y, temperature, distill)
    return loss_local, loss_meme


def mixture_step(local_logits: torch.Tensor, meme_logits: torch.Tensor, y: torch.Tensor,
                 weight: float, lr: float) -> float:
    """One SGD step on the personal mixture's weight (APFL, Deng et al. 2020).

    The client's prediction is ``w·softmax(local) + (1-w)·softmax(meme)``; ``w`` descends
    the batch's mean cross-entropy of that mixture, d/dw = -mean((p_l[y] - p_m[y]) / p[y]),
    and stays in [0, 1]. The models' outputs are detached: only ``w`` learns here.
    """
    p_l = F.softmax(local_logits.detach(), 1).gather(1, y[:, None])[:, 0]
    p_m = F.softmax(meme_logits.detach(), 1).gather(1, y[:, None])[:, 0]
    mixed = (weight * p_l + (1 - weight) * p_m).clamp_min(1e-12)
    grad = -((p_l - p_m) / mixed).mean().item()
    return min(1.0, max(0.0, weight - lr * grad))


def anchor_of(model: nn.Module) -> list[torch.Tensor]:
    """A detached copy of the model's trainable parameters: what :func:`proximal_term`
    pulls toward (FedProx's and Ditto's received global model)."""
    return [p.detach().clone() for p in model.parameters()]


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """½·‖w − w_global‖² over the trainable parameters (FedProx); multiply by μ."""
    return 0.5 * sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor,
                                                           strict=True))


def peer_losses(logits: dict[str, torch.Tensor], y: torch.Tensor, alpha: float, beta: float,
                temperature: float = 1.0, distill: Distill = PLAIN,
                log_prior: torch.Tensor | None = None, shared: str = "meme",
                ) -> dict[str, torch.Tensor]:
    """Deep mutual learning among K private peers and the meme (Zhang et al. 2018).

    Every model learns its CE plus the mean, over the other models, of its KL toward each
    one: L_s = CE_s + (1-α)·mean_{t≠s} w_st·KL(p_t ‖ p_s) for a private peer s, with β in
    place of α for the meme; ``fixed`` weighting scales the CE by α (β) as in
    :func:`mutual_losses`, ``adaptive`` divides each pair's KL by CE_s + CE_t (detached),
    gates and the meme's label prior apply to every pair. A model whose logits are not
    finite is nobody's teacher. With one peer this is :func:`mutual_losses`, exactly.
    """
    names = list(logits)
    finite = {k: bool(v.isfinite().all()) for k, v in logits.items()}
    if len(names) == 2 and shared in logits:
        peer = next(k for k in names if k != shared)
        loss_p, loss_m = mutual_losses(logits[peer], logits[shared], y,
                                       alpha if finite[shared] else 1.0,
                                       beta if finite[peer] else 1.0, temperature, distill,
                                       log_prior)
        return {peer: loss_p, shared: loss_m}
    ce = {k: F.cross_entropy(v, y) for k, v in logits.items()}
    additive = distill.weighting is DistillWeighting.ADDITIVE
    out = {}
    for s in names:
        coef = beta if s == shared else alpha
        loss = ce[s] if additive else coef * ce[s]
        teachers = [t for t in names if t != s and finite[t]]
        if coef < 1 and teachers:
            terms = []
            for t in teachers:
                teacher = (logits[t] + log_prior if t == shared and log_prior is not None
                           else logits[t])
                weight = (1.0 / (ce[s] + ce[t]).detach().clamp_min(1e-8)
                          if distill.weighting is DistillWeighting.ADAPTIVE else 1.0)
                terms.append(weight * distill_term(logits[s], teacher, y, temperature,
                                                    distill))
            loss = loss + (1 - coef) * sum(terms) / len(terms)
        out[s] = loss
    return out
