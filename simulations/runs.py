"""The grid's result folders as data, and the small helpers every report shares.

``<root>/<preset>/<algorithm>-seed<seed>/{metrics,config,clients}.json``, finished runs only.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

Runs = dict[str, dict[str, list[dict[str, Any]]]]

RUN_DIR = re.compile(r"^(?P<algorithm>[a-z][a-z0-9.-]*?)-seed(?P<seed>\d+)$")
ORDER = ["fml", "fedavg", "fedprox", "fedavg-ft", "ditto", "codistill", "local"]
# The client-side accuracy each algorithm is judged by: FML's personalised prediction (its
# ``personal-model``: the private model, the tuned meme or their mixture) and local's
# private model, FedAvg's and FedProx's global model on each client's own test split; the
# others (FedAvg's fine-tuned copy, Ditto's personal model) report their personalised model
# as local.
PERSONAL_KEY = {"fml": "local_accuracy", "local": "local_accuracy", "fedavg": "meme_accuracy",
                "fedprox": "meme_accuracy"}


def personal_key(algo: str, run: dict[str, Any]) -> str:
    """The accuracy a run is judged by: with ``personal-mix``, FML's mixture of the two. A
    variant (``fml-k2``) is judged as the algorithm its config names."""
    algo = str(run.get("config", {}).get("algorithm", algo))
    if algo == "fml" and run.get("config", {}).get("personal-mix"):
        return "mix_accuracy"
    return PERSONAL_KEY.get(algo, "local_accuracy")


#: what each FML ``personal-model`` scores as the personalised prediction (``local_accuracy``)
PERSONAL_MODEL = {"private": "private model", "tuned": "tuned meme", "choice": "chosen model",
                  "mix": "private + tuned meme"}
#: what the other algorithms report as ``local_accuracy``
LOCAL_IS = {"local": "private model", "codistill": "private model",
            "fedavg-ft": "fine-tuned model", "ditto": "personal model"}


def personal_label(algo: str, run: dict[str, Any]) -> str:
    """What :func:`personal_key` scores for this run, in words, for a legend: FML's
    personalised prediction follows its ``personal-model`` (the private model only with
    ``private``), FedAvg's is the global model, FedAvg+FT's the fine-tuned copy."""
    from common.config import recorded_config  # older records: the value they ran with

    key = personal_key(algo, run)
    if key == "mix_accuracy":
        return "mixture"
    if key != "local_accuracy":
        return "global model"
    config = recorded_config(run.get("config", {}))
    family = str(config.get("algorithm", algo))
    if family == "fml":
        return PERSONAL_MODEL.get(str(config.get("personal-model")), "personalised model")
    return LOCAL_IS.get(family, "personalised model")


def order_key(algo: str, run: dict[str, Any]) -> tuple[int, str]:
    """Where a run's algorithm (or variant, by the algorithm its config names) sorts in
    tables and plots: in :data:`ORDER`, a variant after its algorithm."""
    base = str(run.get("config", {}).get("algorithm", algo))
    return (ORDER.index(base) if base in ORDER else len(ORDER), algo)


def run_label(name: str, config: dict[str, Any]) -> str:
    """The name a run is reported under: its folder's, except that an ``fml`` run with the
    paper's keys (the private model as the personalised one, no extra meme epochs; every
    ``fml`` run recorded before the payoff map chose FML's defaults, issue #24) is
    ``fml-paper``, the variant that runs it today."""
    from common.config import recorded_config  # a key older records lack: its value then
    from simulations.grid import paper_keys

    ran = recorded_config(config)
    if name == "fml" and all(ran[k] == v for k, v in paper_keys().items()):
        return "fml-paper"
    return name


def load_runs(root: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{preset: {algorithm: [run, ...]}}``; each run has ``seed``, ``records``, ``config``."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    where: dict[tuple[str, str, int], Path] = {}
    for metrics in sorted(root.glob("*/*/metrics.json")):
        m = RUN_DIR.match(metrics.parent.name)
        if not m:
            continue
        records = json.loads(metrics.read_text())
        config = json.loads((metrics.parent / "config.json").read_text())
        if len(records) < int(config["num-server-rounds"]):
            continue  # unfinished: the grid will resume it
        clients = metrics.parent / "clients.json"
        label = run_label(m["algorithm"], config)
        cell = (metrics.parent.parent.name, label, int(m["seed"]))
        if cell in where:  # `fml-seed0` of the paper's keys beside an `fml-paper-seed0`
            raise SystemExit(f"{where[cell]} and {metrics.parent} are both {label} seed "
                             f"{cell[2]} of {cell[0]}: keep one (a seed counts once)")
        where[cell] = metrics.parent
        runs[metrics.parent.parent.name][label].append(
            {"seed": int(m["seed"]), "records": records, "config": config,
             "clients": json.loads(clients.read_text()) if clients.exists() else []})
    if not runs:
        raise SystemExit(f"no finished runs under {root} (expected <preset>/<algo>-seed<N>/)")
    return runs


def mean_std(values: list[float]) -> str:
    """Accuracies in %: the mean ± std over seeds (one seed: the value)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def series(records: list[dict[str, Any]], key: str) -> list[float]:
    """A metric's values over the rounds that recorded it."""
    return [r[key] for r in records if r.get(key) is not None]




def pyplot():
    """matplotlib's pyplot without a display (reports run on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write a figure at the reports' resolution and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
