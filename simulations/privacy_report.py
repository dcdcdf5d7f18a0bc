"""The privacy/utility comparison: accuracy against the ε each run spent.

Runs with the privacy switches (their config has ``dp-mode``) and ``uniform`` aggregation
(which DP requires, so the ε = ∞ baseline uses it too) go into a table and
``privacy-utility.png``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from simulations.runs import Runs, mean_std, order_key, pyplot, save_figure, series


def _epsilon(run: dict[str, Any]) -> float:
    """The ε a run spent (inf: no DP, or σ = 0)."""
    if run["config"].get("dp-mode", "none") == "none":
        return float("inf")
    eps = series(run["records"], "dp_epsilon")
    return eps[-1] if eps else float("inf")


def _eps_text(eps: float) -> str:
    return "∞" if eps == float("inf") else f"{eps:.2f}"


def privacy_runs(runs: Runs,
                 ) -> list[tuple[float, str, str, list[dict[str, Any]]]]:
    """``(ε, preset, algorithm, runs)`` for the privacy/utility comparison, by falling ε:
    the uniform-averaging runs, where at least one run of the folder used DP (the others
    are its ε = ∞ baseline); none otherwise."""
    if not any(r["config"].get("dp-mode", "none") != "none"
               for algos in runs.values() for rs in algos.values() for r in rs):
        return []
    rows = []
    for preset, algos in runs.items():
        for algo, rs in algos.items():
            if all("dp-mode" in r["config"] and r["config"].get("aggregation") == "uniform"
                   for r in rs):
                rows.append((max(_epsilon(r) for r in rs), preset, algo, rs))
    return sorted(rows, key=lambda t: (-t[0], t[1], order_key(t[2], t[3][0])))


def privacy_table(runs: Runs) -> str:
    """ε against accuracy: FML's private model and meme, FedAvg's global model."""
    rows = privacy_runs(runs)
    if not rows:
        return ""
    lines = ["| ε (δ = config) | preset | algorithm | σ | C | private model acc. final "
             "| private model acc. best | meme / global acc. (clients) final "
             "| central acc. final |",
             "|---|---|---|---|---|---|---|---|---|"]
    for eps, preset, algo, rs in rows:
        cfg = rs[0]["config"]
        dp = cfg.get("dp-mode", "none") != "none"
        finals = {k: [series(r["records"], k)[-1] for r in rs if series(r["records"], k)]
                  for k in ("local_accuracy", "meme_accuracy", "central_meme_accuracy")}
        best = [max(series(r["records"], "local_accuracy")) for r in rs
                if series(r["records"], "local_accuracy")]
        lines.append(
            f"| {_eps_text(eps)} | {preset} | {algo} | "
            f"{cfg['dp-noise-multiplier'] if dp else '–'} | "
            f"{cfg['dp-clipping-norm'] if dp else '–'} | "
            f"{mean_std(finals['local_accuracy'])} | {mean_std(best)} | "
            f"{mean_std(finals['meme_accuracy'])} | "
            f"{mean_std(finals['central_meme_accuracy'])} |")
    return "\n".join(lines) + "\n"


def plot_privacy(runs: Runs, path: Path) -> bool:
    """Final accuracy against ε: FML private model, FML meme, FedAvg/FedProx global."""
    rows = privacy_runs(runs)
    if not rows:
        return False
    plt = pyplot()
    labels = sorted({_eps_text(e) for e, *_ in rows},
                    key=lambda t: -float("inf") if t == "∞" else -float(t))
    lines: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for eps, _, algo, rs in rows:
        for key, what in (("local_accuracy", "private model"), ("meme_accuracy",
                                                                 "meme" if algo.startswith("fml")
                                                                 else "global model")):
            vals = [100 * series(r["records"], key)[-1] for r in rs
                    if series(r["records"], key)]
            if vals:
                lines[f"{algo} ({what})"][_eps_text(eps)] = vals
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in lines.items():
        xs = [i for i, t in enumerate(labels) if t in points]
        means = [float(np.mean(points[labels[i]])) for i in xs]
        stds = [float(np.std(points[labels[i]])) for i in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(labels)), [f"ε = {t}" for t in labels])
    ax.set_ylabel("final accuracy on the clients' test splits (%)")
    ax.set_title("Privacy/utility: client-level DP on the meme", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True
