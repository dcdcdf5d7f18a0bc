"""Turn grid result folders into a Markdown table and PNG plots.

    python -m simulations.report outputs/grid --out outputs/grid/report

Reads ``<root>/<preset>/<algorithm>-seed<seed>/{metrics,config}.json`` and writes
``results.md`` (per preset and algorithm: accuracies best and final, mean ± std over seeds,
wall time, bytes sent), ``accuracy-<preset>.png`` (accuracy per round, mean over seeds with
a ±std band) and ``labels-<preset>.png`` (each client's label distribution); from each
run's ``clients.json`` a per-client table and ``client-gains.png``
(:mod:`simulations.clients_report`).

Runs with the privacy switches (their config has ``dp-mode``) and ``uniform`` aggregation
(which DP requires, so the ε = ∞ baseline uses it too) also go into a privacy/utility table
and ``privacy-utility.png``: accuracy against the ε each run spent.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tomllib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulations.clients_report import client_table, plot_gains

RUN_DIR = re.compile(r"^(?P<algorithm>[a-z]+)-seed(?P<seed>\d+)$")
ORDER = ["fml", "fedavg", "fedprox", "local"]
# The client-side accuracy each algorithm is judged by: FML's and local's private model,
# FedAvg's and FedProx's global model on each client's own test split.
PERSONAL_KEY = {"fml": "local_accuracy", "local": "local_accuracy", "fedavg": "meme_accuracy",
                "fedprox": "meme_accuracy"}


def personal_key(algo: str, run: dict[str, Any]) -> str:
    """The accuracy a run is judged by: with ``personal-mix``, FML's mixture of the two."""
    if algo == "fml" and run.get("config", {}).get("personal-mix"):
        return "mix_accuracy"
    return PERSONAL_KEY.get(algo, "local_accuracy")


def load_runs(root: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{preset: {algorithm: [run, ...]}}``; each run has ``seed``, ``records``, ``config``."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for metrics in sorted(root.glob("*/*/metrics.json")):
        m = RUN_DIR.match(metrics.parent.name)
        if not m:
            continue
        records = json.loads(metrics.read_text())
        config = json.loads((metrics.parent / "config.json").read_text())
        if len(records) < int(config["num-server-rounds"]):
            continue  # unfinished: the grid will resume it
        clients = metrics.parent / "clients.json"
        runs[metrics.parent.parent.name][m["algorithm"]].append(
            {"seed": int(m["seed"]), "records": records, "config": config,
             "clients": json.loads(clients.read_text()) if clients.exists() else []})
    if not runs:
        raise SystemExit(f"no finished runs under {root} (expected <preset>/<algo>-seed<N>/)")
    return runs


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def _series(records: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in records if r.get(key) is not None]


def _epsilon(run: dict[str, Any]) -> float:
    """The ε a run spent (inf: no DP, or σ = 0)."""
    if run["config"].get("dp-mode", "none") == "none":
        return float("inf")
    eps = _series(run["records"], "dp_epsilon")
    return eps[-1] if eps else float("inf")


def _eps_text(eps: float) -> str:
    return "∞" if eps == float("inf") else f"{eps:.2f}"


def privacy_runs(runs: dict[str, dict[str, list[dict[str, Any]]]],
                 ) -> list[tuple[float, str, str, list[dict[str, Any]]]]:
    """``(ε, preset, algorithm, runs)`` for the privacy/utility comparison, by falling ε."""
    rows = []
    for preset, algos in runs.items():
        for algo, rs in algos.items():
            if all("dp-mode" in r["config"] and r["config"].get("aggregation") == "uniform"
                   for r in rs):
                rows.append((max(_epsilon(r) for r in rs), preset, algo, rs))
    return sorted(rows, key=lambda t: (-t[0], t[1], ORDER.index(t[2]) if t[2] in ORDER
                                       else 99))


def privacy_table(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
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
        finals = {k: [_series(r["records"], k)[-1] for r in rs if _series(r["records"], k)]
                  for k in ("local_accuracy", "meme_accuracy", "central_meme_accuracy")}
        best = [max(_series(r["records"], "local_accuracy")) for r in rs
                if _series(r["records"], "local_accuracy")]
        lines.append(
            f"| {_eps_text(eps)} | {preset} | {algo} | "
            f"{cfg['dp-noise-multiplier'] if dp else '–'} | "
            f"{cfg['dp-clipping-norm'] if dp else '–'} | "
            f"{_mean_std(finals['local_accuracy'])} | {_mean_std(best)} | "
            f"{_mean_std(finals['meme_accuracy'])} | "
            f"{_mean_std(finals['central_meme_accuracy'])} |")
    return "\n".join(lines) + "\n"


def plot_privacy(runs: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> bool:
    """Final accuracy against ε: FML private model, FML meme, FedAvg/FedProx global."""
    rows = privacy_runs(runs)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({_eps_text(e) for e, *_ in rows},
                    key=lambda t: -float("inf") if t == "∞" else -float(t))
    lines: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for eps, _, algo, rs in rows:
        for key, what in (("local_accuracy", "private model"), ("meme_accuracy",
                                                                 "meme" if algo == "fml"
                                                                 else "global model")):
            vals = [100 * _series(r["records"], key)[-1] for r in rs
                    if _series(r["records"], key)]
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def table(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """The Markdown results table (accuracies in %, mean ± std over seeds)."""
    lines = ["| preset | algorithm | seeds | personalised acc. final | personalised acc. best "
             "| local acc. final | meme acc. (clients) final | central meme acc. final "
             "| central meme acc. best | wall time (s) | MB sent |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in sorted(runs):
        algos = sorted(runs[preset], key=lambda a: ORDER.index(a) if a in ORDER else 99)
        for algo in algos:
            rs = runs[preset][algo]
            cols: dict[str, list[float]] = defaultdict(list)
            for r in rs:
                rec = r["records"]
                for key, name in ((personal_key(algo, r), "pers"),
                                  ("local_accuracy", "local"), ("meme_accuracy", "meme"),
                                  ("central_meme_accuracy", "central")):
                    s = _series(rec, key)
                    if s:
                        cols[f"{name}_final"].append(s[-1])
                        cols[f"{name}_best"].append(max(s))
                cols["seconds"].append(sum(x["seconds"] for x in rec))
                cols["mb"].append(sum(x["bytes_up"] + x["bytes_down"] for x in rec) / 1e6)
            lines.append(
                f"| {preset} | {algo} | {len(rs)} | {_mean_std(cols['pers_final'])} | "
                f"{_mean_std(cols['pers_best'])} | {_mean_std(cols['local_final'])} | "
                f"{_mean_std(cols['meme_final'])} | {_mean_std(cols['central_final'])} | "
                f"{_mean_std(cols['central_best'])} | {statistics.mean(cols['seconds']):.0f} | "
                f"{statistics.mean(cols['mb']):.0f} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(preset: str, algos: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Personalised and central accuracy per round: mean over seeds, ±std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], None, "Personalised accuracy (each client's own test split)"),
              (axes[1], "central_meme_accuracy", "Global model on the central test set"))
    for ax, key, title in panels:
        for algo in sorted(algos, key=lambda a: ORDER.index(a) if a in ORDER else 99):
            k = key or personal_key(algo, algos[algo][0])
            series = [_series(r["records"], k) for r in algos[algo]]
            series = [s for s in series if s]
            if not series:
                continue
            n = min(map(len, series))
            arr = 100 * np.array([s[:n] for s in series])
            x = np.arange(1, n + 1)
            what = {"local_accuracy": "private model", "mix_accuracy": "mixture"}
            label = f"{algo} ({what.get(k, 'global model')})"
            ax.plot(x, arr.mean(0), marker="o", ms=3, label=label)
            if len(arr) > 1:
                ax.fill_between(x, arr.mean(0) - arr.std(0), arr.mean(0) + arr.std(0), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = max(len(v) for v in algos.values())
    fig.suptitle(f"{preset}: mean over {seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_labels(preset: str, config: dict[str, Any], num_clients: int, path: Path) -> None:
    """Each client's label counts (train split of its partition), as stacked bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.config import load_config
    from common.data import client_partition_indices, load_dataset

    keep = {k: v for k, v in config.items() if k not in ("resume-from",)}
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(root: Path, out: Path) -> list[Path]:
    """Write the table and the plots; returns the files written."""
    runs = load_runs(root.resolve())
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.md"]
    text = f"# Results from {root}\n\n" + table(runs)
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
