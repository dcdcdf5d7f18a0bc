"""Every registered model builds from the task shape and produces one logit per class."""

import pytest
import torch

from common.models import TaskSpec, build_model
from common.options import MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("spec", [TaskSpec(1, 28, 10), TaskSpec(3, 32, 100), TaskSpec(1, 8, 10)])
def test_forward_shape(name, spec):
    model = build_model(name, spec)
    out = model(torch.zeros(2, spec.channels, spec.size, spec.size))
    assert out.shape == (2, spec.num_classes)


@pytest.mark.parametrize("name", ["cnn", "cnn-bn", "cnn-cifar", "lenet5"])
@pytest.mark.parametrize("size", [5, 8, 9, 15, 16, 17, 28, 31, 32])
def test_two_conv_models_fit_every_image_side(name, size):
    """The flattened feature count is computed, not probed: a wrong count fails the FC."""
    model = build_model(name, TaskSpec(3, size, 7))
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 7)


def test_cnn_is_the_pflib_fedavg_cnn_on_28px():
    model = build_model("cnn", TaskSpec(1, 28, 10))
    n = sum(p.numel() for p in model.parameters())
    # conv 1->32 (5x5) + conv 32->64 (5x5) + fc 1024->512 + fc 512->10
    assert n == (25 * 32 + 32) + (25 * 32 * 64 + 64) + (1024 * 512 + 512) + (512 * 10 + 10)


def test_lenet5_is_lecuns_on_28px():
    model = build_model("lenet5", TaskSpec(1, 28, 10))
    n = sum(p.numel() for p in model.parameters())
    # conv 1->6 (5x5, padded: 28 -> 14 after the pool) + conv 6->16 (5x5: 14 -> 10 -> 5)
    # + fc 400->120 + fc 120->84 + fc 84->10
    assert n == (25 * 6 + 6) + (25 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (
        84 * 10 + 10) == 61_706


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", TaskSpec(1, 28, 10))


def test_channels_last_pool_matches_the_nchw_kernel_on_ties_and_nan():
    """Integer-valued inputs make ties common; the first maximum must win in both kernels,
    and the gradient must land on the same element."""
    from common.models import MaxPool2x2

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (4, 6, 9, 10), generator=g).float()
    x[0, 0, 0, 0] = float("nan")
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    out_ref, idx_ref = torch.nn.functional.max_pool2d(a, 2, return_indices=True)
    out = MaxPool2x2()(b)
    assert out.is_contiguous() and out.shape == (4, 6, 4, 5)
    assert torch.equal(out.nan_to_num(7.0), out_ref.nan_to_num(7.0))
    weights = torch.randn(out.shape, generator=g)
    (out_ref.nan_to_num(0.0) * weights).sum().backward()
    (out.nan_to_num(0.0) * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)
    assert int((b.grad != 0).sum()) > 100  # gradients did flow to many chosen elements


def _reference_two_conv(spec, c1, c2, batch_norm=False):
    """The textbook block order (conv, [BN], ReLU, pool) with PyTorch's own modules."""
    from torch import nn

    pad = 0 if spec.size >= 16 else 2

    def block(i, o):
        return [nn.Conv2d(i, o, 5, padding=pad), *([nn.BatchNorm2d(o)] if batch_norm else []),
                nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(spec.channels, c1), *block(c1, c2), nn.Flatten())


@pytest.mark.parametrize("name", ["cnn", "cnn-bn"])
def test_pool_before_relu_trains_bit_for_bit_like_the_textbook_order(name):
    """Three SGD steps of the shipped model and of conv-ReLU-pool built from PyTorch's
    modules, from the same weights: identical logits, gradients and weights throughout."""
    from torch import nn

    spec = TaskSpec(1, 28, 10)
    model = build_model(name, spec)
    ref = nn.Sequential(_reference_two_conv(spec, 32, 64, batch_norm=name == "cnn-bn"),
                        nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
    ref.load_state_dict(model.state_dict(), strict=True)  # same parameter names
    g = torch.Generator().manual_seed(1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref)]
    for _ in range(3):
        x = torch.randn(10, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (10,), generator=g)
        outs = []
        for m, opt in zip((model, ref), opts, strict=True):
            opt.zero_grad()
            out = m(x)
            torch.nn.functional.cross_entropy(out, y).backward()
            opt.step()
            outs.append(out.detach())
        assert torch.equal(outs[0], outs[1])
        ours, theirs = model.state_dict(), ref.state_dict()  # weights and BN statistics
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), k
    assert not torch.equal(model[-1].weight, build_model(name, spec)[-1].weight)  # it trained
