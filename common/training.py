"""One local update and the evaluation of the two models: the loop that feeds the losses of
``common/mutual.py`` batch by batch. Plain PyTorch; nothing here knows about Flower.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from common.mutual import (
    label_log_prior,
    mixture_step,
    mutual_losses,
    proximal_term,
    seen_log_mask,
)
from common.options import Distill, DistillPrior


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
    autocast: torch.dtype | None = None  # precision = "bf16": torch.bfloat16
    compile: bool = False  # torch-compile


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
    fwd_l = compiled(local, device) if hp.compile and local is not None else local
    fwd_m = compiled(meme, device) if hp.compile and meme is not None else meme
    log_prior = None
    want_prior = mutual and hp.distill.prior is not DistillPrior.NONE
    mix = hp.mix if mutual else None
    for _ in range(hp.epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for start in range(0, len(y), hp.batch_size):
            batch = order[start:start + hp.batch_size]
            xb, yb = x[batch], y[batch]
            with _autocast(device, hp.autocast):
                out_l = fwd_l(xb) if local is not None else None
                out_m = fwd_m(xb) if meme is not None else None
            if hp.autocast is not None:  # the losses and their softmaxes in float32
                out_l = out_l.float() if out_l is not None else None
                out_m = out_m.float() if out_m is not None else None
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


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; nothing at all when None (float32 untouched)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None \
        else contextlib.nullcontext()


def compiled(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(model)`` for training (it shares the model's parameters, so the
    optimizer and ``state_dict`` stay those of ``model``). PyTorch caches the compiled code
    per process and reuses it for every instance of the same architecture. On the CPU
    inductor builds C++ kernels: without a compiler the key is refused here, not deep
    inside the first step."""
    if device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise ConfigError("run-config key 'torch-compile' = true needs a C++ compiler for "
                          "inductor's CPU kernels, and none was found (g++, c++, clang++ or "
                          "$CXX): install one (Debian: apt install g++) or set it to false")
    return torch.compile(model)


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
