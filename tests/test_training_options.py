"""Opt-in options of the local update that change its arithmetic: bfloat16 autocast
(``precision``) and ``torch-compile``, each against an independent implementation."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.algorithms import get
from common.config import ConfigError
from common.models import TaskSpec, build_model
from common.training import Hyper, train_epochs

FML = get("fml")

CPU = torch.device("cpu")


def _linear(seed, d_in, d_out):
    torch.manual_seed(seed)
    m = nn.Linear(d_in, d_out)
    return m, torch.optim.SGD(m.parameters(), lr=0.5)


def test_bf16_autocast_runs_the_forward_in_bfloat16_and_keeps_float32_weights():
    """One CE step of each model (α = β = 1) under autocast equals a hand-written step whose
    linear layer multiplies bfloat16 copies of the input and the float32 weights."""
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    local, ol = _linear(1, 6, 3)
    meme, om = _linear(2, 6, 3)
    hp = Hyper(alpha=1.0, beta=1.0, batch_size=8, autocast=torch.bfloat16)
    train_epochs({"local": local, "meme": meme}, {"local": ol, "meme": om}, FML, x, y, hp,
                 torch.Generator().manual_seed(0), CPU)
    assert all(p.dtype == torch.float32 for p in [*local.parameters(), *meme.parameters()])
    for seed, trained in ((1, local), (2, meme)):
        ref, opt = _linear(seed, 6, 3)
        logits = F.linear(x.bfloat16(), ref.weight.bfloat16(), ref.bias.bfloat16()).float()
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()
        assert torch.allclose(trained.weight, ref.weight, atol=1e-6, rtol=0)
        assert torch.allclose(trained.bias, ref.bias, atol=1e-6, rtol=0)
        plain, popt = _linear(seed, 6, 3)  # float32: visibly other numbers
        popt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        popt.step()
        assert (plain.weight - ref.weight).abs().max() > 1e-4


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor needs a C++ compiler on the CPU (its refusal is tested below)")
def test_compiled_training_matches_eager_and_keeps_the_models_own_state():
    """Two different architectures, two epochs with a short last batch (a second shape):
    the compiled update lands where the eager one does, and the modules' state_dict keys
    stay their own (the optimizer and the private store see the real parameters)."""
    from torch._dynamo.utils import counters

    spec = TaskSpec(1, 8, 10)
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    results = []
    graphs_before = counters["stats"]["unique_graphs"]
    for compile_ in (False, True):
        torch.manual_seed(0)
        local, meme = build_model("mlp", spec), nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (local, meme)]
        keys = [list(m.state_dict()) for m in (local, meme)]
        hp = Hyper(batch_size=16, epochs=2, compile=compile_)
        stats = train_epochs({"local": local, "meme": meme},
                             dict(zip(("local", "meme"), opts, strict=True)), FML, x, y, hp,
                             torch.Generator().manual_seed(3), CPU)
        assert [list(m.state_dict()) for m in (local, meme)] == keys
        results.append((local, meme, stats))
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiled path ran
    (el, em, es), (cl, cm, cs) = results
    for a, b in ((el, cl), (em, cm)):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-5), (p - q).abs().max()
    assert cs.loss_local == pytest.approx(es.loss_local, rel=1e-5)
    assert cs.accuracies["meme"] == es.accuracies["meme"]


def test_torch_compile_without_a_cpp_compiler_is_refused_naming_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    model, opt = _linear(0, 4, 2)
    with pytest.raises(ConfigError, match="'torch-compile' = true needs a C\\+\\+ compiler"):
        train_epochs({"local": model}, {"local": opt}, get("local"), torch.randn(4, 4),
                     torch.tensor([0, 1, 0, 1]),
                     Hyper(batch_size=2, compile=True), torch.Generator().manual_seed(0), CPU)
    assert torch.equal(model.weight, _linear(0, 4, 2)[0].weight)  # refused before a step
