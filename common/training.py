"""One local update and the evaluation of the models: the loop that feeds an algorithm's
losses (``common/algorithms``) batch by batch. Plain PyTorch; nothing here knows about
Flower.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from common.options import Distill

if TYPE_CHECKING:
    from common.algorithms.base import Algorithm


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
    """Per trained model: mean loss over the samples it stepped on; per model seen: accuracy."""

    num_examples: int
    losses: dict[str, float]
    accuracies: dict[str, float]
    skipped_steps: int = 0  # optimizer steps not taken because the loss was NaN/Inf
    mix: float | None = None  # what the algorithm learnt besides weights (personal-mix)

    @property
    def loss_local(self) -> float | None:
        return self.losses.get("local")

    @property
    def loss_meme(self) -> float | None:
        return self.losses.get("meme")


def train_epochs(
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    algorithm: Algorithm,
    x: torch.Tensor,
    y: torch.Tensor,
    hp: Hyper,
    generator: torch.Generator,
    device: torch.device,
) -> TrainStats:
    """Train on (x, y) for ``hp.epochs``: every model sees the same shuffled batches, the
    algorithm turns all of their logits into each trained model's loss, and each one steps
    on its own optimizer, in slot order. A model without an optimizer is a frozen teacher
    (co-distillation's): it predicts in eval mode, without gradients. A non-finite loss is
    never stepped on. The data stays in memory: batches are index slices, no DataLoader
    workers.
    """
    if not models:
        raise ValueError("train_epochs needs at least one model")
    for k, m in models.items():
        m.train(k in optimizers)
    x, y = x.to(device), y.to(device)
    forward = {k: _frozen(m) if k not in optimizers
               else compiled(m, device) if hp.compile else m for k, m in models.items()}
    state = algorithm.begin(models, y, hp)
    loss_sum = dict.fromkeys(models, 0.0)
    loss_n = dict.fromkeys(models, 0)  # samples whose loss was finite (and stepped on)
    correct = dict.fromkeys(models, 0)
    trained: set[str] = set()
    n_seen = skipped = 0
    try:
        for _ in range(hp.epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            for start in range(0, len(y), hp.batch_size):
                batch = order[start:start + hp.batch_size]
                xb, yb = x[batch], y[batch]
                with _autocast(device, hp.autocast):
                    out = {k: f(xb) for k, f in forward.items()}
                if hp.autocast is not None:  # the losses and their softmaxes in float32
                    out = {k: v.float() for k, v in out.items()}
                for key, loss in algorithm.losses(out, yb, hp, state).items():
                    if key not in optimizers:  # a frozen teacher never trains
                        continue
                    trained.add(key)
                    if not bool(loss.isfinite()):  # never step on a NaN/Inf loss
                        skipped += 1
                        continue
                    opt = optimizers[key]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum[key] += loss.item() * len(yb)
                    loss_n[key] += len(yb)
                for key, logits in out.items():
                    correct[key] += (logits.argmax(1) == yb).sum().item()
                n_seen += len(yb)
    finally:  # the algorithm's hooks come off even when a step raises
        extra = algorithm.end(state)
    losses = {k: loss_sum[k] / loss_n[k] if loss_n[k] else float("nan")
              for k in models if k in trained}
    accuracies = {k: correct[k] / n_seen if n_seen else float("nan") for k in models}
    return TrainStats(len(y), losses, accuracies, skipped, extra)


def _frozen(model: nn.Module):
    """A teacher's forward pass (the module called, hooks included): no graph, no
    gradient."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)
    return predict


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
def evaluate_ensemble(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                      device: torch.device, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the models' mean softmax: K peers' one prediction."""
    if len(y) == 0:
        return float("nan"), float("nan")
    for m in models:
        m.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        p = torch.stack([F.softmax(m(xb), 1) for m in models]).mean(0)
        loss += F.nll_loss(p.clamp_min(1e-12).log(), yb, reduction="sum").item()
        correct += (p.argmax(1) == yb).sum().item()
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
