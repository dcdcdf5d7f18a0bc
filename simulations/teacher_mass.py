"""How much of the meme's probability lands on classes a client never sees (issue #11).

    python -m simulations.teacher_mass RUN_DIR [RUN_DIR ...]

For a finished FML run: load its final meme (the teacher every client receives next) and,
for each client's training split, the mean probability the meme puts on classes absent
from that split, with and without the client-prior correction (``distill-prior=client``).
A teacher that spends much of its mass there pulls the private model toward classes its
test split never holds: one diagnosis of why distilling from the meme can cost accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from common.config import load_config, recorded_config
from common.data import dataset_spec, load_client_data
from common.models import build_model
from common.mutual import label_log_prior


@torch.no_grad()
def unseen_mass(run_dir: Path, num_clients: int) -> list[dict[str, float]]:
    """Per client: train size, classes seen, meme mass on unseen classes (raw, corrected)."""
    recorded = recorded_config(json.loads((run_dir / "config.json").read_text()))
    cfg = load_config({k: v for k, v in recorded.items() if k != "resume-from"})
    spec = dataset_spec(cfg)
    meme = build_model(cfg.meme_model, spec)
    meme.load_state_dict(torch.load(run_dir / "meme_final.pt", weights_only=True))
    meme.eval()
    out = []
    for pid in range(num_clients):
        data = load_client_data(cfg, pid, num_clients)
        seen = torch.bincount(data.y_train, minlength=spec.num_classes) > 0
        logits = torch.cat([meme(data.x_train[i:i + 1024])
                            for i in range(0, len(data.y_train), 1024)])
        raw = logits.softmax(1)[:, ~seen].sum(1).mean().item()
        prior = label_log_prior(data.y_train, spec.num_classes)
        corrected = (logits + prior).softmax(1)[:, ~seen].sum(1).mean().item()
        out.append({"client": pid, "num_train": len(data.y_train),
                    "classes_seen": int(seen.sum()), "unseen_mass": raw,
                    "unseen_mass_corrected": corrected})
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Print the per-client table and the means for each run folder."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--clients", type=int, default=20)
    a = p.parse_args(argv)
    for run in a.runs:
        rows = unseen_mass(run.resolve(), a.clients)
        print(f"{run}: meme mass on unseen classes, mean over {len(rows)} clients: "
              f"{100 * statistics.mean(r['unseen_mass'] for r in rows):.1f} % raw, "
              f"{100 * statistics.mean(r['unseen_mass_corrected'] for r in rows):.1f} % "
              "with the client prior")
        for r in rows:
            print(f"  client {r['client']:2d}: {r['num_train']:5d} train, "
                  f"{r['classes_seen']:2d} classes, {100 * r['unseen_mass']:5.1f} % raw, "
                  f"{100 * r['unseen_mass_corrected']:5.1f} % corrected")


if __name__ == "__main__":
    main()
