"""Deep mutual learning without a federation (Zhang et al., CVPR 2018), by the product's
own loss and loop.

    python -m simulations.dml [--models cnn,cnn] [--sizes 1000,5000,20000,60000]
                              [--seeds 0,1,2] [--steps 2000] [--out simulations/results/dml]

K models (2-4, any of the architectures) train on the same subset of Fashion-MNIST's
training images, once mutually (each learns CE + the mean KL toward the others:
:func:`common.mutual.peer_losses`, the loss of a client's private peers) and once
independently (CE alone), through :func:`common.training.train_epochs`, the loop every
client runs. Both runs start from the same initial weights and see the same batches in
the same order; the loss, optimiser and its settings are the run config's defaults
(``alpha``, ``temperature``, ``distill-*``, ``lr``, ``momentum``, ``batch-size``). Every
training-set size gets the same number of SGD steps, so a small set is seen for many epochs
(where one model overfits and a peer's soft labels should help most).

Each finished (size, seed) is written to ``results.json`` at once, so an interrupted run
resumes where it stopped; ``report.md`` and ``dml.png`` (gain against size) are rewritten
at the end from everything there. Each ``--models`` (and ``--alpha``) is a study of its own
folder under ``--out`` (``cnn-cnn``, ``cnn-mlp``, ``cnn-cnn-alpha0.0``...).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.algorithms.base import Algorithm
from common.atomic import atomic_write
from common.config import load_config
from common.datasets import load_dataset
from common.models import build_model
from common.options import MODEL_NAMES
from common.runtime import derive_seed
from common.training import Hyper, evaluate, evaluate_ensemble, make_optimizer, train_epochs
from simulations.runs import pyplot, save_figure

DEFAULT_OUT = Path("simulations/results/dml")


class Mutual(Algorithm):
    """K students, no meme: each learns CE + (1-α)·mean KL toward the others (the loss of
    a client's private peers, :func:`common.mutual.peer_losses`)."""

    name = "dml"

    def losses(self, out: Mapping[str, torch.Tensor], y: torch.Tensor, hp: Hyper,
               state: Any) -> dict[str, torch.Tensor]:
        from common.mutual import peer_losses

        return peer_losses(dict(out), y, hp.alpha, hp.alpha, hp.temperature, hp.distill,
                           shared="")


INDEPENDENT = Algorithm()  # the defaults: each model on its own cross-entropy
MUTUAL = Mutual()


def subset(n_total: int, size: int, seed: int) -> np.ndarray:
    """``size`` training indices drawn without replacement, seeded by (seed, size)."""
    rng = np.random.default_rng(derive_seed(seed, "dml-subset", size))
    return np.sort(rng.choice(n_total, size=min(size, n_total), replace=False))


def epochs_for(size: int, batch_size: int, steps: int) -> int:
    """Epochs that give about ``steps`` SGD steps on ``size`` images (at least one)."""
    return max(1, round(steps / math.ceil(size / batch_size)))


def train_cell(archs: Sequence[str], size: int, seed: int, steps: int,
               device: torch.device, alpha: float | None = None) -> dict[str, Any]:
    """One (size, seed): the K models trained mutually and independently, from the same
    initial weights on the same batches; each model's test accuracy and the ensemble's.
    ``alpha``: the run config's ``alpha`` unless given (1: no distillation at all)."""
    cfg = load_config({} if alpha is None else {"alpha": alpha})
    ds = load_dataset("fashion-mnist")
    idx = subset(len(ds.y_train), size, seed)
    x, y = torch.from_numpy(ds.x_train[idx]), torch.from_numpy(ds.y_train[idx])
    x_test, y_test = torch.tensor(ds.x_test), torch.tensor(ds.y_test)
    epochs = epochs_for(len(y), cfg.batch_size, steps)
    hp = Hyper(alpha=cfg.alpha, beta=cfg.alpha, temperature=cfg.temperature,
               batch_size=cfg.batch_size, epochs=epochs, distill=cfg.distill)
    cell: dict[str, Any] = {"size": len(y), "seed": seed, "models": list(archs),
                            "epochs": epochs, "steps": steps}
    for mode, algorithm in (("independent", INDEPENDENT), ("mutual", MUTUAL)):
        models: dict[str, nn.Module] = {}
        for i, arch in enumerate(archs):
            torch.manual_seed(derive_seed(seed, "dml-init", i))
            models[f"m{i + 1}"] = build_model(arch, ds.spec).to(device)
        optimizers = {k: make_optimizer(m, cfg) for k, m in models.items()}
        gen = torch.Generator().manual_seed(derive_seed(seed, "dml-shuffle", size))
        start = time.perf_counter()
        train_epochs(models, optimizers, algorithm, x, y, hp, gen, device)
        cell[mode] = {
            "accuracy": [evaluate(m, x_test, y_test, device)[1] for m in models.values()],
            "ensemble": evaluate_ensemble(list(models.values()), x_test, y_test, device)[1],
            "seconds": time.perf_counter() - start}
    return cell


def gains(cell: Mapping[str, Any]) -> list[float]:
    """Per model: mutual minus independent test accuracy (points of 1)."""
    return [m - i for m, i in zip(cell["mutual"]["accuracy"], cell["independent"]["accuracy"],
                                  strict=True)]


def _pm(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.2f}" if values else "–"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def report(cells: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table: per size, each model alone and mutual (mean ± std over seeds),
    the gain, and the ensembles."""
    archs = cells[0]["models"]
    head = ["train images", "epochs", "seeds"]
    for i, a in enumerate(archs):
        head += [f"m{i + 1} ({a}) alone", f"m{i + 1} mutual", f"m{i + 1} gain"]
    head += ["ensemble alone", "ensemble mutual"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sorted({c["size"] for c in cells}):
        cs = [c for c in cells if c["size"] == size]
        row = [str(size), str(cs[0]["epochs"]), str(len(cs))]
        for i in range(len(archs)):
            alone = [c["independent"]["accuracy"][i] for c in cs]
            mutual = [c["mutual"]["accuracy"][i] for c in cs]
            row += [_pm(alone), _pm(mutual), _pm([gains(c)[i] for c in cs])]
        row += [_pm([c["independent"]["ensemble"] for c in cs]),
                _pm([c["mutual"]["ensemble"] for c in cs])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def figure(cells: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Gain of mutual over independent training against the training-set size, per model
    (mean ± std over seeds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted({c["size"] for c in cells})
    for i, arch in enumerate(cells[0]["models"]):
        per = [[100 * gains(c)[i] for c in cells if c["size"] == s] for s in sizes]
        mean = [statistics.mean(v) for v in per]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per]
        ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=f"m{i + 1} ({arch})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images (Fashion-MNIST)")
    ax.set_ylabel("mutual − alone, test accuracy (points)")
    ax.set_title("Deep mutual learning without a federation")
    ax.legend()
    save_figure(fig, path)


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn,cnn",
                   help=f"2-4 comma-separated architectures ({', '.join(MODEL_NAMES)})")
    p.add_argument("--sizes", default="1000,5000,20000,60000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=2000, help="SGD steps at every size")
    p.add_argument("--alpha", type=float, default=None,
                   help="the KL toward the others is weighted 1-α (CE keeps full weight "
                   "under the default additive weighting); default: the run config's 0.5; "
                   "the DML paper's weight is α = 0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.models.split(",") if a.strip()]
    unknown = [a for a in archs if a not in MODEL_NAMES]
    if unknown or not 2 <= len(archs) <= 4:
        p.error(f"--models: expected 2-4 of {', '.join(MODEL_NAMES)}, got {args.models!r}")
    if args.steps < 1:
        p.error(f"--steps: expected a positive integer, got {args.steps}")
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out / ("-".join(archs) + ("" if args.alpha is None else f"-alpha{args.alpha}"))
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    kept = json.loads(results.read_text()) if results.exists() else []
    cells = [c for c in kept if c.get("steps", 2000) == args.steps]  # this --steps' cells
    others = [c for c in kept if c.get("steps", 2000) != args.steps]
    done = {(c["size"], c["seed"]) for c in cells}
    for size in sizes:
        for seed in seeds:
            if (min(size, 60000), seed) in done:
                continue
            cell = train_cell(archs, size, seed, args.steps, torch.device(args.device),
                              args.alpha)
            cells.append(cell)
            _write(results, json.dumps(others + cells, indent=1))
            print(f"size {cell['size']:>6} seed {seed}: alone "
                  f"{[round(100 * a, 2) for a in cell['independent']['accuracy']]}, mutual "
                  f"{[round(100 * a, 2) for a in cell['mutual']['accuracy']]} "
                  f"({cell['mutual']['seconds']:.0f} s)", flush=True)
    table = report(cells)
    _write(out / "report.md", (
        f"Deep mutual learning without a federation: `python -m simulations.dml --models "
        f"{','.join(archs)} --steps {args.steps}"
        f"{'' if args.alpha is None else f' --alpha {args.alpha}'}` (Fashion-MNIST test set, "
        "10,000 images; "
        "mean ± std over seeds).\n\n" + table + "\n"))
    figure(cells, out / "dml.png")
    print(table)


if __name__ == "__main__":
    main()
