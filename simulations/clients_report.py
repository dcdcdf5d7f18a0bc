"""The per-client view of a grid: does mutual learning pay off client by client?

A sample-weighted mean hides who gains: a few large clients can carry it while the small
ones, for whom federation should matter most, lose. From each run's ``clients.json``
(final round) this computes, per preset and algorithm and averaged over seeds:

- the sample-weighted mean (as in ``metrics.json``) and the unweighted mean over clients;
- the mean over the worst 25 % of clients and over the 25 % with the least training data;
- where a ``local`` run of the same preset and seed exists, each client's gain over it
  (personalised accuracy minus local-only accuracy, same client key), the share of
  clients that gain, and a plot of gain against the client's training-set size.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simulations.runs import pyplot, save_figure

Row = dict[str, Any]
#: the accuracy a run is judged by: (algorithm, run) -> clients.json key
PersonalKey = Callable[[str, dict[str, Any]], str]


def quarter(n: int) -> int:
    """How many clients make up 25 % (at least one)."""
    return max(1, math.ceil(n / 4))


def final_clients(run: dict[str, Any]) -> list[Row]:
    """The clients of a run's last evaluated round (empty if the run has no clients.json)."""
    return run.get("clients", [{}])[-1].get("clients", []) if run.get("clients") else []


def summary(rows: Sequence[Row], key: str) -> dict[str, float]:
    """Weighted and unweighted means, worst-25 % and smallest-25 % means of ``key``."""
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return {}
    n_test = sum(r["num_test"] for r in rows)
    worst = sorted(rows, key=lambda r: (r[key], r["key"]))[:quarter(len(rows))]
    smallest = sorted(rows, key=lambda r: (r["num_train"] or 0, r["key"]))[:quarter(len(rows))]
    return {"weighted": sum(r[key] * r["num_test"] for r in rows) / n_test,
            "unweighted": statistics.mean(r[key] for r in rows),
            "worst25": statistics.mean(r[key] for r in worst),
            "smallest25": statistics.mean(r[key] for r in smallest)}


def gains(rows: Sequence[Row], key: str, local_rows: Sequence[Row]) -> list[tuple[int, float]]:
    """``(num_train, accuracy - local-only accuracy)`` per client present in both runs."""
    local = {r["key"]: r["local_accuracy"] for r in local_rows
             if r.get("local_accuracy") is not None}
    return [(int(r["num_train"] or 0), r[key] - local[r["key"]]) for r in rows
            if r.get(key) is not None and r["key"] in local]


def gain_summary(pairs: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Mean gain, share of clients that gain, mean gain of the 25 % smallest clients."""
    if not pairs:
        return {}
    smallest = sorted(pairs)[:quarter(len(pairs))]
    return {"gain": statistics.mean(g for _, g in pairs),
            "share": sum(g > 0 for _, g in pairs) / len(pairs),
            "gain_smallest25": statistics.mean(g for _, g in smallest)}


def _pct(values: list[float], signed: bool = False) -> str:
    if not values:
        return "–"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    mean = fmt.format(100 * statistics.mean(values))
    return mean if len(values) == 1 else f"{mean} ± {100 * statistics.stdev(values):.2f}"


def client_table(runs: dict[str, dict[str, list[dict[str, Any]]]],
                 personal_key: PersonalKey) -> str:
    """Markdown: per preset and algorithm, the per-client statistics (mean ± std over seeds)."""
    lines = ["| preset | algorithm | seeds | weighted | unweighted | worst 25 % "
             "| smallest 25 % | gain over local (clients) | clients that gain "
             "| gain, smallest 25 % |", "|---|---|---|---|---|---|---|---|---|---|"]
    any_row = False
    for preset in sorted(runs):
        local_by_seed = {r["seed"]: final_clients(r) for r in runs[preset].get("local", [])}
        for algo, rs in sorted(runs[preset].items()):
            cols: dict[str, list[float]] = {}
            for r in rs:
                key = personal_key(algo, r)
                rows = final_clients(r)
                for name, v in summary(rows, key).items():
                    cols.setdefault(name, []).append(v)
                if algo != "local" and r["seed"] in local_by_seed:
                    for name, v in gain_summary(gains(rows, key, local_by_seed[r["seed"]])
                                                ).items():
                        cols.setdefault(name, []).append(v)
            if not cols:
                continue
            any_row = True
            lines.append(
                f"| {preset} | {algo} | {len(rs)} | {_pct(cols.get('weighted', []))} | "
                f"{_pct(cols.get('unweighted', []))} | {_pct(cols.get('worst25', []))} | "
                f"{_pct(cols.get('smallest25', []))} | {_pct(cols.get('gain', []), True)} | "
                f"{_pct(cols.get('share', []))} | "
                f"{_pct(cols.get('gain_smallest25', []), True)} |")
    return "\n".join(lines) + "\n" if any_row else ""


def plot_gains(runs: dict[str, dict[str, list[dict[str, Any]]]],
               personal_key: PersonalKey, path: Path) -> bool:
    """Each client's gain over local-only against its training-set size, per algorithm."""
    points: dict[str, list[tuple[int, float]]] = {}
    for preset, algos in sorted(runs.items()):
        local_by_seed = {r["seed"]: final_clients(r) for r in algos.get("local", [])}
        for algo, rs in sorted(algos.items()):
            if algo == "local":
                continue
            for r in rs:
                if r["seed"] in local_by_seed:
                    points.setdefault(f"{preset} / {algo}", []).extend(gains(
                        final_clients(r), personal_key(algo, r), local_by_seed[r["seed"]]))
    points = {k: v for k, v in points.items() if v}
    if not points:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for label, pts in points.items():
        ax.scatter([n for n, _ in pts], [100 * g for _, g in pts], s=14, alpha=0.7, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("client's training samples")
    ax.set_ylabel("accuracy gain over local-only (points)")
    ax.set_title("Per-client gain over local-only training (final round)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True
