"""Markdown table of a screening: one variant per folder, each against local-only.

    python -m simulations.screening.summary outputs/screen [--preset P] [--seed 0]

Reads ``<root>/<variant>/<preset>/<algorithm>-seed<seed>/{metrics,clients}.json`` and, for
every run, the final round's personalised accuracy (FML: the private model, or the
mixture with ``personal-mix``; FedAvg: the global model on each client's split) as the
per-client statistics of :mod:`simulations.clients_report`, with each client's gain over
the ``baseline/<preset>/local-seed<seed>`` run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from simulations.clients_report import gain_summary, gains, summary
from simulations.runs import personal_key


def rows(root: Path, preset: str, seed: int) -> list[str]:
    """One Markdown row per finished run under ``root``."""
    local_dir = root / "baseline" / preset / f"local-seed{seed}"
    local = json.loads((local_dir / "clients.json").read_text())[-1]["clients"]
    out = []
    for run in sorted(root.glob(f"*/{preset}/*-seed{seed}")):
        if not (run / "metrics.json").exists():
            continue  # not started or still in round 1
        config = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        if len(metrics) < config["num-server-rounds"] or not (run / "clients.json").exists():
            continue
        algo = run.name.rsplit("-seed", 1)[0]
        key = personal_key(algo, {"config": config})
        final = json.loads((run / "clients.json").read_text())[-1]["clients"]
        s = summary(final, key)
        g = gain_summary(gains(final, key, local)) if algo != "local" else {}
        gain = (f"{100 * g['gain']:+.2f} | {100 * g['share']:.0f} % | "
                f"{100 * g['gain_smallest25']:+.2f}") if g else "– | – | –"
        central = metrics[-1]["central_meme_accuracy"]
        out.append(f"| {run.parent.parent.name} | {algo} | {100 * s['weighted']:.2f} | "
                   f"{100 * s['unweighted']:.2f} | {100 * s['worst25']:.2f} | "
                   f"{100 * s['smallest25']:.2f} | {gain} | "
                   f"{'–' if central is None else f'{100 * central:.2f}'} |")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--preset", default="leaderboard-fmnist-dir0.1")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print("| variant | algorithm | weighted | unweighted | worst 25 % | smallest 25 % "
          "| gain over local | clients that gain | gain, smallest 25 % | central (meme) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows(a.root, a.preset, a.seed)))


if __name__ == "__main__":
    main()
