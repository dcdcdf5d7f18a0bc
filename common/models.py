"""Model registry: every architecture is built from the task's (channels, size, classes).

The task shape always comes from the dataset, never from the user, so the meme and every
private model agree on the number of classes (which the KL terms need).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.options import MODEL_NAMES


@dataclass(frozen=True)
class TaskSpec:
    """What a model needs to know about the data: image channels, side length, classes."""

    channels: int
    size: int
    num_classes: int


def _pad(spec: TaskSpec) -> int:
    """The 5x5 convolutions' padding: none from 16 px up, 2 below (unpadded, they would
    shrink a small image to nothing)."""
    return 0 if spec.size >= 16 else 2


def _two_conv_flat(spec: TaskSpec, c2: int) -> int:
    """Features after :func:`_two_conv_features`, by arithmetic: each block maps a side s
    to (s + 2·pad - 4) // 2. (A dummy forward pass cost tens of ms per model built, four
    builds per client and round.)"""
    side = spec.size
    for _ in range(2):
        side = (side + 2 * _pad(spec) - 4) // 2
    return c2 * side * side


class _ChannelsLastMaxPool(torch.autograd.Function):
    """2x2 max-pooling through the channels-last kernel; the gradient comes back in the
    input's own layout (a channels-last gradient would send BatchNorm's backward down a
    different summation order)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out, idx = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2,
                                return_indices=True)
        ctx.save_for_backward(idx)
        ctx.input_shape = x.shape
        return out.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (idx,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        # windows do not overlap: each input element gets at most one output's gradient
        return grad.new_zeros(n, c, h * w).scatter_(
            2, idx.contiguous().view(n, c, -1), grad.contiguous().view(n, c, -1)
        ).view(n, c, h, w)


class MaxPool2x2(nn.MaxPool2d):
    """2x2 max-pooling, run in channels-last layout on the CPU.

    PyTorch's CPU max-pool kernel for the default (NCHW) layout is an order of magnitude
    slower than its channels-last kernel (here 1.05 ms vs 0.07 ms for a 10x32x24x24 batch,
    about a sixth of a ``cnn`` training step). Both pick the first maximum of each window (NaN
    wins), so the values, the indices and hence the gradients are the same bit for bit.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        return _ChannelsLastMaxPool.apply(x)


def _conv_block(c_in: int, c_out: int, pad: int, batch_norm: bool = False) -> list[nn.Module]:
    """5x5 conv (+ BatchNorm), 2x2 max-pool, ReLU.

    Pooling before the ReLU is the same function as after it (ReLU is monotone, so
    max(relu(a)) = relu(max(a))), with the same gradient: where the window's maximum is
    positive both route it to the first maximum, elsewhere both give zero. The ReLU then
    touches a quarter of the values. The parameter names are those of conv, ReLU, pool.
    """
    norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
    return [nn.Conv2d(c_in, c_out, 5, padding=pad), *norm, MaxPool2x2(), nn.ReLU()]


def _two_conv_features(spec: TaskSpec, c1: int, c2: int) -> nn.Sequential:
    """Two 5x5 conv + 2x2 max-pool + ReLU blocks, flattened."""
    pad = _pad(spec)
    return nn.Sequential(*_conv_block(spec.channels, c1, pad), *_conv_block(c1, c2, pad),
                         nn.Flatten())


def cnn(spec: TaskSpec) -> nn.Module:
    """The FedAvg paper's CNN as PFLlib builds it (2 conv 5x5 + pool, FC 512, FC out).

    On 28x28 input it has 1,024 features after the convolutions (582k parameters with 10
    classes).
    """
    features = _two_conv_features(spec, 32, 64)
    return nn.Sequential(
        features, nn.Linear(_two_conv_flat(spec, 64), 512), nn.ReLU(),
        nn.Linear(512, spec.num_classes),
    )


def cnn_bn(spec: TaskSpec) -> nn.Module:
    """:func:`cnn` with BatchNorm after each convolution (FedBN's setting): the small model
    whose state holds statistics buffers and an integer counter besides its weights."""
    pad = _pad(spec)
    features = nn.Sequential(*_conv_block(spec.channels, 32, pad, batch_norm=True),
                             *_conv_block(32, 64, pad, batch_norm=True), nn.Flatten())
    return nn.Sequential(features, nn.Linear(_two_conv_flat(spec, 64), 512), nn.ReLU(),
                         nn.Linear(512, spec.num_classes))


def mlp(spec: TaskSpec) -> nn.Module:
    """The FedAvg paper's 2NN: two hidden layers of 200 units."""
    d = spec.channels * spec.size * spec.size
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, spec.num_classes),
    )


def cnn_cifar(spec: TaskSpec) -> nn.Module:
    """The FedAvg paper's CIFAR CNN (TensorFlow tutorial): 2 conv 5x5x64, FC 384, FC 192."""
    features = _two_conv_features(spec, 64, 64)
    return nn.Sequential(
        features, nn.Linear(_two_conv_flat(spec, 64), 384), nn.ReLU(),
        nn.Linear(384, 192), nn.ReLU(), nn.Linear(192, spec.num_classes),
    )


def lenet5(spec: TaskSpec) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998; ReLU and max-pooling, as PFL-MoE and PFLlib use it): 5x5
    conv to 6 channels (padded), 5x5 conv to 16, FC 120, FC 84, FC out; 61,706 parameters
    on 28x28 with 10 classes, a fifteenth of :func:`cnn`'s work per image. The
    data-scarce literature's model (issue #24)."""
    side = spec.size // 2  # conv 5x5 padded by 2 keeps the side; the pool halves it
    pad = 0 if side >= 8 else 2  # as _pad: below 8 px the second conv would leave nothing
    side = (side + 2 * pad - 4) // 2
    return nn.Sequential(
        *_conv_block(spec.channels, 6, 2), *_conv_block(6, 16, pad), nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, spec.num_classes),
    )


def resnet18(spec: TaskSpec) -> nn.Module:
    """torchvision's ResNet-18 adapted to small images: 3x3 stride-1 stem, no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=spec.num_classes)
    model.conv1 = nn.Conv2d(spec.channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[TaskSpec], nn.Module]] = {
    "cnn": cnn,
    "cnn-bn": cnn_bn,
    "mlp": mlp,
    "cnn-cifar": cnn_cifar,
    "resnet18": resnet18,
    "lenet5": lenet5,
}
if tuple(MODELS) != MODEL_NAMES:  # the config validates names without importing torch
    raise ImportError(f"common.models registers {tuple(MODELS)}, but common.options.MODEL_NAMES "
                      f"lists {MODEL_NAMES}: keep the two in step")


def build_model(name: str, spec: TaskSpec) -> nn.Module:
    """Build a registered model for the task; the caller seeds torch beforehand."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}") from None
    return factory(spec)
