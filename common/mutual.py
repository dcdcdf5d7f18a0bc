"""Deep mutual learning between the private local model and the meme: the loss, one epoch,
and evaluation. Plain PyTorch; nothing here knows about Flower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.options import Distill, DistillGate, DistillPrior, DistillWeighting

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


def _distill_term(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor,
                  temperature: float, distill: Distill) -> torch.Tensor:
    """The batch mean of the (gated) per-sample KL toward ``teacher``."""
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
        loss_local = loss_local + (1 - alpha) * weight * _distill_term(
            local_logits, teacher, y, temperature, distill)
    if beta < 1:
        loss_meme = loss_meme + (1 - beta) * weight * _distill_term(
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


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """½·‖w − w_global‖² over the trainable parameters (FedProx); multiply by μ."""
    return 0.5 * sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor,
                                                           strict=True))


@dataclass
class Hyper:
    """Training hyper-parameters of one local update (a subset of the run config)."""

    alpha: float = 0.5
    beta: float = 0.5
    temperature: float = 1.0
    proximal_mu: float = 0.0
    batch_size: int = 32
    epochs: int = 1
    distill: Distill = field(default_factory=Distill)
    mix: float | None = None  # personal-mix: the mixture weight to learn (None: off)
    mix_lr: float = 0.01


@dataclass
class TrainStats:
    """Mean losses and accuracies over the samples seen; None for a model not trained."""

    num_examples: int
    loss_local: float | None
    loss_meme: float | None
    acc_local: float | None
    acc_meme: float | None
    skipped_steps: int = 0  # optimizer steps not taken because the loss was NaN/Inf
    mix: float | None = None  # the learned mixture weight (personal-mix), else None


def train_epochs(
    local: nn.Module | None,
    meme: nn.Module | None,
    opt_local: torch.optim.Optimizer | None,
    opt_meme: torch.optim.Optimizer | None,
    x: torch.Tensor,
    y: torch.Tensor,
    hp: Hyper,
    generator: torch.Generator,
    device: torch.device,
) -> TrainStats:
    """Train on (x, y) for ``hp.epochs``; both models see the same shuffled batches.

    With both models: mutual learning, both updated every step. With one model (FedAvg,
    FedProx, local-only): plain cross-entropy, plus FedProx's proximal term when μ > 0.
    The data stays in memory: batches are index slices, no DataLoader workers.
    """
    if local is None and meme is None:
        raise ValueError("train_epochs needs at least one model")
    mutual = local is not None and meme is not None
    anchor = ([p.detach().clone() for p in meme.parameters()]
              if meme is not None and hp.proximal_mu > 0 else None)
    models = [m for m in (local, meme) if m is not None]
    for m in models:
        m.train()
    sums = {"ll": 0.0, "lm": 0.0, "cl": 0, "cm": 0}
    n_seen = skipped = 0
    n_loss = {"l": 0, "m": 0}  # samples whose loss was finite (and stepped on)
    x, y = x.to(device), y.to(device)
    log_prior = None
    want_prior = mutual and hp.distill.prior is not DistillPrior.NONE
    mix = hp.mix if mutual else None
    for _ in range(hp.epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for start in range(0, len(y), hp.batch_size):
            batch = order[start:start + hp.batch_size]
            xb, yb = x[batch], y[batch]
            out_l = local(xb) if local is not None else None
            out_m = meme(xb) if meme is not None else None
            if mix is not None and bool(out_l.isfinite().all() and out_m.isfinite().all()):
                mix = mixture_step(out_l, out_m, yb, mix, hp.mix_lr)
            if want_prior and log_prior is None:
                log_prior = (label_log_prior(y, out_m.shape[1])
                             if hp.distill.prior is DistillPrior.CLIENT
                             else seen_log_mask(y, out_m.shape[1]))
            if mutual:
                # a diverged model (non-finite logits) is never a teacher: the other one
                # learns from the labels alone, so a meme blown up by DP noise or a bad
                # learning rate cannot turn the private model into NaNs
                finite_l, finite_m = bool(out_l.isfinite().all()), bool(out_m.isfinite().all())
                loss_l, loss_m = mutual_losses(out_l, out_m, yb,
                                               hp.alpha if finite_m else 1.0,
                                               hp.beta if finite_l else 1.0, hp.temperature,
                                               hp.distill, log_prior)
            else:
                loss_l = F.cross_entropy(out_l, yb) if out_l is not None else None
                loss_m = F.cross_entropy(out_m, yb) if out_m is not None else None
            if loss_m is not None and anchor is not None:
                loss_m = loss_m + hp.proximal_mu * proximal_term(meme, anchor)
            for loss, opt, key in ((loss_l, opt_local, "l"), (loss_m, opt_meme, "m")):
                if loss is None:
                    continue
                if not bool(loss.isfinite()):  # never step on a NaN/Inf loss
                    skipped += 1
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums[f"l{key}"] += loss.item() * len(yb)
                n_loss[key] += len(yb)
            if out_l is not None:
                sums["cl"] += (out_l.argmax(1) == yb).sum().item()
            if out_m is not None:
                sums["cm"] += (out_m.argmax(1) == yb).sum().item()
            n_seen += len(yb)

    def mean(key: str, model: nn.Module | None, n: int) -> float | None:
        return None if model is None else (sums[key] / n if n else float("nan"))

    return TrainStats(len(y), mean("ll", local, n_loss["l"]), mean("lm", meme, n_loss["m"]),
                      mean("cl", local, n_seen), mean("cm", meme, n_seen), skipped, mix)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a model on (x, y)."""
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        out = model(xb)
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    return loss / len(y), correct / len(y)


@torch.no_grad()
def evaluate_mixture(local: nn.Module, meme: nn.Module, weight: float, x: torch.Tensor,
                     y: torch.Tensor, device: torch.device, batch_size: int = 512,
                     ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``w·softmax(local) + (1-w)·softmax(meme)``."""
    if len(y) == 0:
        return float("nan"), float("nan")
    local.eval()
    meme.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        p = weight * F.softmax(local(xb), 1) + (1 - weight) * F.softmax(meme(xb), 1)
        loss += F.nll_loss(p.clamp_min(1e-12).log(), yb, reduction="sum").item()
        correct += (p.argmax(1) == yb).sum().item()
    return loss / len(y), correct / len(y)


def make_optimizer(model: nn.Module, cfg: object) -> torch.optim.Optimizer:
    """SGD with the run config's ``lr``, ``momentum`` and ``weight-decay``."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)
