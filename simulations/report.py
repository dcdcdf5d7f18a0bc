"""Turn grid result folders into a Markdown table and PNG plots.

    python -m simulations.report outputs/grid --out outputs/grid/report

Reads ``<root>/<preset>/<algorithm>-seed<seed>/{metrics,config}.json`` and writes
``results.md`` (per preset and algorithm: accuracies best and final, mean ± std over seeds,
wall time, bytes sent), ``accuracy-<preset>.png`` (accuracy per round, mean over seeds with
a ±std band) and ``labels-<preset>.png`` (each client's label distribution); from each
run's ``clients.json`` a per-client table and ``client-gains.png``
(:mod:`simulations.clients_report`); for the runs with the privacy switches a
privacy/utility table and ``privacy-utility.png`` (:mod:`simulations.privacy_report`).
"""

from __future__ import annotations

import argparse
import statistics
import tomllib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulations.clients_report import client_table, plot_gains
from simulations.privacy_report import plot_privacy, privacy_table
from simulations.runs import (
    Runs,
    load_runs,
    mean_std,
    order_key,
    personal_key,
    personal_label,
    pyplot,
    save_figure,
    series,
)


def table(runs: Runs) -> str:
    """The Markdown results table (accuracies in %, mean ± std over seeds)."""
    lines = ["| preset | algorithm | seeds | personalised acc. final | personalised acc. best "
             "| local acc. final | meme acc. (clients) final | central meme acc. final "
             "| central meme acc. best | wall time (s) | MB sent | peers' mean acc. final "
             "| s/round | MB/round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in sorted(runs):
        algos = sorted(runs[preset], key=lambda a: order_key(a, runs[preset][a][0]))
        for algo in algos:
            rs = runs[preset][algo]
            rounds = max(1, statistics.mean(len(r["records"]) for r in rs))
            cols: dict[str, list[float]] = defaultdict(list)
            for r in rs:
                rec = r["records"]
                for key, name in ((personal_key(algo, r), "pers"),
                                  ("local_accuracy", "local"), ("meme_accuracy", "meme"),
                                  ("central_meme_accuracy", "central"),
                                  ("peers_accuracy", "peers")):
                    s = series(rec, key)
                    if s:
                        cols[f"{name}_final"].append(s[-1])
                        cols[f"{name}_best"].append(max(s))
                cols["seconds"].append(sum(x["seconds"] for x in rec))
                cols["mb"].append(sum(x["bytes_up"] + x["bytes_down"] for x in rec) / 1e6)
            lines.append(
                f"| {preset} | {algo} | {len(rs)} | {mean_std(cols['pers_final'])} | "
                f"{mean_std(cols['pers_best'])} | {mean_std(cols['local_final'])} | "
                f"{mean_std(cols['meme_final'])} | {mean_std(cols['central_final'])} | "
                f"{mean_std(cols['central_best'])} | {statistics.mean(cols['seconds']):.0f} | "
                f"{statistics.mean(cols['mb']):.0f} | {mean_std(cols['peers_final'])} | "
                f"{statistics.mean(cols['seconds']) / rounds:.1f} | "
                f"{statistics.mean(cols['mb']) / rounds:.2f} |")
    return "\n".join(lines) + "\n"


def peer_table(runs: Runs) -> str:
    """With K > 1 private peers: each peer's final accuracy alone (the first is
    ``local_accuracy``, the others ``peer_accuracies``) and their mean prediction; empty
    when no run has peers."""
    rows = []
    for preset in sorted(runs):
        for algo in sorted(runs[preset], key=lambda a: order_key(a, runs[preset][a][0])):
            cols: dict[str, list[float]] = defaultdict(list)
            for r in runs[preset][algo]:
                last = next((x for x in reversed(r["records"]) if x.get("peer_accuracies")),
                            None)
                if last is None:
                    continue
                for name, acc in {"local": last["local_accuracy"], **last["peer_accuracies"],
                                  "mean": last["peers_accuracy"]}.items():
                    cols[name].append(acc)
            if cols:
                peers = " / ".join(mean_std(cols[n]) for n in cols if n != "mean")
                rows.append(f"| {preset} | {algo} | {len(cols['local'])} | {peers} | "
                            f"{mean_std(cols['mean'])} |")
    if not rows:
        return ""
    return ("| preset | algorithm | seeds | each peer's acc. final (first / second / …) "
            "| peers' mean prediction |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def seed_curves(runs: list[list[dict[str, Any]]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """The rounds where every seed recorded ``key`` (with ``evaluate-every`` not all of
    them), and the seeds' values there: (rounds, seeds x rounds)."""
    recorded = [{r["round"]: r[key] for r in rec if r.get(key) is not None} for rec in runs]
    recorded = [d for d in recorded if d]
    if not recorded:
        return np.array([]), np.empty((0, 0))
    rounds = sorted(set.intersection(*(set(d) for d in recorded)))
    return np.array(rounds), np.array([[d[r] for r in rounds] for d in recorded])


def plot_accuracy(preset: str, algos: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Personalised and central accuracy per round: mean over seeds, ±std band."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], None, "Personalised accuracy (each client's own test split)"),
              (axes[1], "central_meme_accuracy", "Global model on the central test set"))
    ordered = sorted(algos, key=lambda a: order_key(a, algos[a][0]))
    for ax, key, title in panels:
        for algo in ordered:  # one colour per algorithm in both panels
            k = key or personal_key(algo, algos[algo][0])
            x, arr = seed_curves([r["records"] for r in algos[algo]], k)
            if not len(x):
                continue
            arr = 100 * arr
            shared = "meme" if algo.startswith("fml") else "global model"
            label = f"{algo} ({shared if key else personal_label(algo, algos[algo][0])})"
            color = f"C{ordered.index(algo) % 10}"
            ax.plot(x, arr.mean(0), marker="o", ms=3, label=label, color=color)
            if len(arr) > 1:
                ax.fill_between(x, arr.mean(0) - arr.std(0), arr.mean(0) + arr.std(0),
                                alpha=0.2, color=color)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = max(len(v) for v in algos.values())
    fig.suptitle(f"{preset}: mean over {seeds} seed(s)")
    save_figure(fig, path)


def plot_labels(preset: str, config: dict[str, Any], num_clients: int, path: Path) -> None:
    """Each client's label counts (train split of its partition), as stacked bars."""
    plt = pyplot()
    from common.config import load_config, recorded_config
    from common.data import client_partition_indices, load_dataset

    keep = {k: v for k, v in recorded_config(config).items() if k not in ("resume-from",)}
    cfg = load_config(keep)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    parts = client_partition_indices(cfg, num_clients)
    k = ds.spec.num_classes
    counts = np.array([np.bincount(ds.y_train[p], minlength=k) for p in parts])
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * num_clients + 2), 4))
    bottom = np.zeros(num_clients)
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    for c in range(k):
        ax.bar(np.arange(num_clients), counts[:, c], bottom=bottom, color=cmap(c % cmap.N),
               label=str(c))
        bottom += counts[:, c]
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("samples")
    ax.set_xticks(np.arange(num_clients))
    ax.set_title(f"{preset}: label distribution per client ({cfg.partitioner.value}, "
                 f"seed {cfg.seed})")
    ax.legend(title="label", fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    save_figure(fig, path)


def write_report(root: Path, out: Path) -> list[Path]:
    """Write the table and the plots; returns the files written."""
    runs = load_runs(root.resolve())
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.md"]
    text = f"# Results from {root}\n\n" + table(runs)
    peers = peer_table(runs)
    if peers:
        text += "\n## Private peers (K > 1), each alone\n\n" + peers
    privacy = privacy_table(runs)
    if privacy:
        text += "\n## Privacy/utility\n\n" + privacy
    per_client = client_table(runs, personal_key)
    if per_client:
        text += "\n## Per client (final round)\n\n" + per_client
    (out / "results.md").write_text(text)
    if plot_gains(runs, personal_key, out / "client-gains.png"):
        written.append(out / "client-gains.png")
    if plot_privacy(runs, out / "privacy-utility.png"):
        written.append(out / "privacy-utility.png")
    for preset, algos in runs.items():
        plot_accuracy(preset, algos, out / f"accuracy-{preset}.png")
        written.append(out / f"accuracy-{preset}.png")
        first = next(iter(algos.values()))[0]
        seen = max(r["num_clients"] for r in first["records"])
        plot_labels(preset, first["config"], _num_clients(preset, seen),
                    out / f"labels-{preset}.png")
        written.append(out / f"labels-{preset}.png")
    return written


def _num_clients(preset: str, fallback: int) -> int:
    """The preset's client count (supernodes.toml), else the most clients seen in a round."""
    from simulations.grid import PRESETS

    counts = tomllib.loads((PRESETS / "supernodes.toml").read_text())
    return int(counts.get(preset, fallback))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -m simulations.report ROOT [--out DIR]``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    for path in write_report(a.root, a.out or a.root / "report"):
        print(path)


if __name__ == "__main__":
    main()
