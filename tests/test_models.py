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


@pytest.mark.parametrize("name", ["cnn", "cnn-bn", "cnn-cifar"])
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


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", TaskSpec(1, 28, 10))
