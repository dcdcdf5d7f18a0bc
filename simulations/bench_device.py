"""Training throughput of one FML client on the CPU and on CUDA, with no Flower around it.

    python -m simulations.bench_device [--batch-sizes 10 32 64] [--steps 200]
        [--variants fp32 bf16 compile]

The client's own loop (``common.training.train_epochs``, the default loss) on a private
``cnn`` and a ``cnn`` meme, 28x28 inputs, 10 classes: samples per second on every device
present, after a warm-up pass, and the GPU/CPU ratio (issue #14's target: >= 10x). It needs
only torch and this project's ``common`` package, so it runs on a GPU machine that has no
Flower or Ray (``PYTHONPATH=. python3 -m simulations.bench_device``). ``--variants`` adds
the opt-in keys that change the arithmetic, each on every device: ``bf16``
(``precision="bf16"``) and ``compile`` (``torch-compile``); the ratio is always against the
CPU in float32, eager.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common.algorithms import get as get_algorithm
from common.flwr_local import ROOT, save_benchmark
from common.models import TaskSpec, build_model
from common.training import Hyper, make_optimizer, train_epochs

SGD = SimpleNamespace(lr=0.01, momentum=0.0, weight_decay=0.0)  # the leaderboard protocol's


VARIANTS = {"fp32": {}, "bf16": {"autocast": torch.bfloat16}, "compile": {"compile": True}}


def samples_per_second(device: torch.device, batch_size: int, steps: int,
                       variant: str = "fp32") -> float:
    """FML samples per second (both models trained on each) over ``steps`` batches; the
    warm-up pass also pays ``compile``'s compilation."""
    spec = TaskSpec(1, 28, 10)
    torch.manual_seed(0)
    local, meme = (build_model("cnn", spec).to(device) for _ in range(2))
    opts = [make_optimizer(m, SGD) for m in (local, meme)]
    n = batch_size * steps
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    hp = Hyper(batch_size=batch_size, **VARIANTS[variant])

    def one_pass(count: int) -> None:
        train_epochs({"local": local, "meme": meme}, dict(zip(("local", "meme"), opts,
                                                              strict=True)),
                     get_algorithm("fml"), x[:count], y[:count], hp,
                     torch.Generator().manual_seed(0), device)

    one_pass(min(n, 20 * batch_size))  # warm-up: kernels chosen, memory allocated
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    one_pass(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    """Measure every device present, print a table, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 32, 64])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--variants", nargs="+", default=["fp32"], choices=list(VARIANTS))
    p.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "device.json")
    a = p.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])
    names = {"cpu": f"CPU, {torch.get_num_threads()} threads"}
    if torch.cuda.is_available():
        names["cuda"] = torch.cuda.get_device_name(0)
    rows = []
    print("| batch | variant | " + " | ".join(names[d.type] for d in devices)
          + " | GPU over CPU fp32 |")
    print("|---" * (len(devices) + 3) + "|")
    for bs in a.batch_sizes:
        cpu_fp32 = None
        for variant in a.variants:
            rates = {d.type: samples_per_second(d, bs, a.steps, variant) for d in devices}
            if variant == "fp32":
                cpu_fp32 = rates["cpu"]
            ratio = rates["cuda"] / cpu_fp32 if "cuda" in rates and cpu_fp32 else None
            rows.append({"batch_size": bs, "variant": variant, "samples_per_second": rates,
                         "gpu_over_cpu": ratio})
            print(f"| {bs} | {variant} | " + " | ".join(f"{rates[d.type]:,.0f}/s"
                                                      for d in devices)
                  + f" | {f'{ratio:.1f}x' if ratio else '-'} |", flush=True)
    save_benchmark(a.json, {"benchmark": "device", "devices": names, "steps": a.steps,
                            "results": rows})


if __name__ == "__main__":
    main()
