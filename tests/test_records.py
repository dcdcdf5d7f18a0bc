"""Records: whole state_dicts (buffers too), strict loading, optimizer state."""

import numpy as np
import pytest
import torch
from torch import nn

from common.models import TaskSpec, build_model
from common.records import load_into, optimizer_from_records, optimizer_to_records, to_record


def test_roundtrip_keeps_batchnorm_buffers_and_dtypes():
    torch.manual_seed(0)
    src = build_model("resnet18", TaskSpec(3, 32, 10))
    src.train()
    src(torch.randn(4, 3, 32, 32))  # moves running stats, counts a batch
    dst = build_model("resnet18", TaskSpec(3, 32, 10))
    load_into(dst, to_record(src.state_dict()))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert int(dst.state_dict()["bn1.num_batches_tracked"]) == 1


def test_strict_loading_names_the_mismatch():
    spec = TaskSpec(1, 28, 10)
    rec = to_record(build_model("cnn", spec).state_dict())
    with pytest.raises(ValueError, match="keys differ"):
        load_into(build_model("mlp", spec), rec)
    with pytest.raises(ValueError, match="shape"):
        load_into(build_model("cnn", TaskSpec(1, 28, 5)), rec)


def test_optimizer_state_roundtrip():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    arrays, scalars = optimizer_to_records(opt)
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer_from_records(fresh, arrays, scalars)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values(),
                    strict=True):
        np.testing.assert_array_equal(a["momentum_buffer"].numpy(),
                                      b["momentum_buffer"].numpy())
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    adam.step()
    arrays, scalars = optimizer_to_records(adam)
    adam2 = torch.optim.Adam(model.parameters())
    optimizer_from_records(adam2, arrays, scalars)
    assert float(adam2.state_dict()["state"][0]["step"]) == 1.0
