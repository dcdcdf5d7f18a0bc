"""Would a fixed blend of FML's two models beat the tuned meme? An offline check of a
finished simulation run (issue #24).

    python -m simulations.blend RUN_DIR [RUN_DIR ...]

For each client of the run's last evaluated round it rebuilds what that evaluation scored,
exactly as the client did (``client/app.py``'s ``evaluate_both``): the client's data, its
private model as saved that round (``state-dir``), the meme in ``checkpoint.pt`` and the
meme tuned on the client's training split with the same seed, and scores
``w·p_private + (1-w)·p_tuned`` on the client's test split for w = 0, 0.1, …, 1. w = 0 and
w = 1 must reproduce the run's ``tuned_accuracy`` and ``private_accuracy`` (printed as a
check). The best w is chosen on the test data itself: an upper bound on what any blend
chosen honestly could add.

Simulation runs only (a client's key is its partition id), with every client evaluated.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from common.config import Config

GRID = tuple(i / 10 for i in range(11))


def rebuild(run: Path) -> list[dict[str, Any]]:
    """Per client of the last evaluated round: test size, the run's recorded accuracies and
    the blend's accuracy for each w of :data:`GRID`."""
    from client.state_file import read_state_file
    from common.algorithms.base import client_evaluation
    from common.data import load_client_data
    from common.models import build_model
    from common.personal import tune_meme

    cfg = _finished_fml_run(run)
    checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    server_round = int(checkpoint["round"])
    records = {r["round"]: r for r in json.loads((run / "clients.json").read_text())}
    if server_round not in records:
        raise SystemExit(f"{run}: checkpoint.pt is of round {server_round}, which "
                         "clients.json does not evaluate")
    clients = records[server_round]["clients"]
    if sorted(c["key"] for c in clients) != list(range(len(clients))):
        raise SystemExit(f"{run}: round {server_round} evaluated clients "
                         f"{sorted(c['key'] for c in clients)}; the rebuild needs every "
                         "partition 0…N-1 (a client that failed would change everyone's split)")
    state_dir = run / "private-state" if (run / "private-state").is_dir() else Path(cfg.state_dir)
    algo, cpu = cfg.algorithm.spec, torch.device("cpu")
    rows = []
    for c in clients:
        key = c["key"]
        data = load_client_data(cfg, key, len(clients), cfg.data_path)
        meme = build_model(cfg.meme_model, data.spec)
        meme.load_state_dict(checkpoint["meme"], strict=True)
        path = state_dir / f"private-{key}.pt"
        if not path.is_file():
            raise SystemExit(f"{path}: client {key}'s private model is missing (expected "
                             "the run's private-state/ folder, or its state-dir)")
        state = read_state_file(path)
        if state["server_round"] != server_round:
            raise SystemExit(f"{path} is of round {state['server_round']}, the checkpoint "
                             f"of round {server_round}")
        saved = state["models"]["local"]
        private = build_model(saved["arch"], data.spec)
        private.load_state_dict(saved["model"], strict=True)
        ev = client_evaluation(cfg, key, data.x_train, data.y_train, cpu, server_round)
        tuned = tune_meme(algo, private, meme, ev)
        private.eval()
        tuned.eval()
        with torch.no_grad():
            p_private = torch.softmax(private(data.x_test), 1)
            p_tuned = torch.softmax(tuned(data.x_test), 1)
        accs = [((w * p_private + (1 - w) * p_tuned).argmax(1) == data.y_test)
                .float().mean().item() for w in GRID]
        rows.append({"key": key, "n": len(data.y_test), "accs": accs,
                     "tuned": c["tuned_accuracy"], "private": c["private_accuracy"]})
    return rows


def _finished_fml_run(run: Path) -> Config:
    """The run's config, once its folder holds what the rebuild reads; else exit naming
    what is missing (committed results keep only the JSON)."""
    from common.config import load_config, recorded_config
    from common.options import PersonalModel

    missing = [f for f in ("config.json", "clients.json", "checkpoint.pt")
               if not (run / f).is_file()]
    if missing:
        raise SystemExit(f"{run}: no {', '.join(missing)}; expected the folder of a finished "
                         "grid run (config.json, clients.json, checkpoint.pt, private-state/)")
    cfg = load_config(recorded_config(json.loads((run / "config.json").read_text())))
    if cfg.algorithm.value != "fml" or cfg.personal_model is PersonalModel.PRIVATE:
        raise SystemExit(f"{run}: algorithm {cfg.algorithm.value!r}, personal-model "
                         f"{cfg.personal_model.value!r}; expected an 'fml' run whose clients "
                         "also scored the tuned meme (personal-model 'tuned', 'choice' or "
                         "'mix')")
    if cfg.fraction_evaluate < 1.0:
        raise SystemExit(f"{run}: fraction-evaluate = {cfg.fraction_evaluate}; the blend "
                         "needs every client evaluated (fraction-evaluate = 1.0)")
    return cfg


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Per w: the mean over clients (unweighted and by test size), the change from w = 0,
    and how many clients gain and lose by it."""
    n = sum(r["n"] for r in rows)
    lines = ["| w | mean (%) | weighted (%) | vs w = 0 (points) | clients gain / lose |",
             "|---|---|---|---|---|"]
    base = statistics.mean(r["accs"][0] for r in rows)
    for i, w in enumerate(GRID):
        mean = statistics.mean(r["accs"][i] for r in rows)
        weighted = sum(r["accs"][i] * r["n"] for r in rows) / n
        gain = sum(r["accs"][i] > r["accs"][0] for r in rows)
        lose = sum(r["accs"][i] < r["accs"][0] for r in rows)
        lines.append(f"| {w:.1f} | {100 * mean:.2f} | {100 * weighted:.2f} | "
                     f"{100 * (mean - base):+.2f} | {gain} / {lose} |")
    return "\n".join(lines)


def check(rows: Sequence[dict[str, Any]]) -> float:
    """The largest gap between the rebuilt w = 0 / w = 1 and the run's own accuracies."""
    return max(max(abs(r["accs"][0] - r["tuned"]), abs(r["accs"][-1] - r["private"]))
               for r in rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for run in args.runs:
        rows = rebuild(run)
        print(f"{run} ({len(rows)} clients); rebuilt w = 0 and 1 against the run's tuned "
              f"and private accuracies: largest gap {check(rows):.1e}\n{table(rows)}\n")


if __name__ == "__main__":
    main()
