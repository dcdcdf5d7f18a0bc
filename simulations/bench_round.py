"""Time per round, side by side with an earlier commit, and where a round's time goes.

    python -m simulations.bench_round --baseline-ref 365e486 [--rounds 4]
        [--preset leaderboard-fmnist-dir0.1] [--algorithm fml] [--no-profile]
        [--no-threads] [--option evaluate-every=2 --option 'precision="bf16"' torch-compile=true]

Runs, one after another on this machine (keep it otherwise idle), the same preset and seed
through the real Flower simulation:

1. the baseline commit's code (``git archive`` of ``--baseline-ref`` into a temporary
   folder; its FAB is what the simulation runs), 2 simulated clients x 1 thread;
2. this tree, 2 clients x 1 thread (``client-resources-num-cpus=1``, the default);
3. this tree, 1 client x 2 threads (``client-resources-num-cpus=2``; not with
   ``--no-threads``);
4. each ``--option KEY=VALUE ...`` (TOML values, as the grid's ``--set``): this tree,
   2 x 1, with those run-config keys set (the opt-in keys that change the work:
   ``evaluate-every``, ``precision``, ``torch-compile``);
5. unless ``--no-profile``: this tree with ``FEDMUTUAL_PROFILE`` set, each round's phases.

Prints seconds per round (rounds after the first: round 1 also starts Ray and identifies
the clients) and whether every metric of every round equals the baseline's (all of
``metrics.json`` but its ``seconds``, and ``clients.json``): a speed-up that changes the
numbers is not the same work. An ``--option`` variant is compared on what it recorded (a
round it did not evaluate has null evaluation keys and fewer bytes down); its seconds per
round are also split into rounds with and without evaluation. Then the profile table: per
phase, seconds per round on the server's clock and the clients' summed busy time.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from common.flwr_local import ROOT, SimLink, save_benchmark
from common.profiling import ENV, read_phases
from simulations.grid import load_preset, overrides, paper_keys

SERVER_PHASES = ("configure-train", "train-exchange", "aggregate", "evaluate-exchange",
                 "central-evaluation", "results-and-checkpoint")

def export_commit(ref: str, dest: Path) -> str:
    """The tree of commit ``ref`` in ``dest``; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT,
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline-ref {ref!r} is not a commit of {ROOT}: "
                         f"{commit.stderr.strip()}")
    archive = subprocess.run(["git", "archive", "--format=tar", commit.stdout.strip()],
                             cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return commit.stdout.strip()


def timed_run(app: Path, run_config: dict[str, Any], clients: int, cpus: int, home: Path,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """One simulation of ``app``; its records and per-round seconds."""
    out = home / "out"
    with SimLink(home, env=env) as link:
        log = link.run({**run_config, "output-dir": str(out), "run-name": "bench"}, clients,
                       timeout=3 * 3600, cpus_per_client=cpus, app=app)
    try:
        records = json.loads((out / "bench" / "metrics.json").read_text())
    except OSError:
        raise SystemExit(f"the run of {app} wrote no results:\n{log[-3000:]}") from None
    clients_file = out / "bench" / "clients.json"  # older commits did not write it
    per_client = json.loads(clients_file.read_text()) if clients_file.exists() else None
    secs = [r["seconds"] for r in records]
    return {"records": records, "clients": per_client, "seconds": secs,
            "per_round": sum(secs[1:]) / max(len(secs) - 1, 1)}


def differences(a: dict[str, Any], b: dict[str, Any], recorded_only: bool = False,
                ) -> list[str]:
    """Metrics of ``b`` that differ from ``a`` (round and key), ``seconds`` aside. With
    ``recorded_only``, keys ``b`` left null and ``bytes_down`` are skipped, and only the
    rounds ``b`` evaluated are compared in ``clients.json`` (``evaluate-every``)."""
    diffs = []
    for ra, rb in zip(a["records"], b["records"], strict=True):
        for key in sorted(set(ra) | set(rb)):
            if key == "seconds" or (recorded_only and (rb.get(key) is None
                                                       or key == "bytes_down")):
                continue
            if ra.get(key) != rb.get(key):
                diffs.append(f"round {ra['round']} {key}: {ra.get(key)} vs {rb.get(key)}")
    clients_a, clients_b = a["clients"], b["clients"]
    if recorded_only and clients_a is not None and clients_b is not None:
        evaluated = {r["round"] for r in clients_b}
        clients_a = [r for r in clients_a if r["round"] in evaluated]
    if clients_a is not None and clients_b is not None and clients_a != clients_b:
        diffs.append("clients.json differs")
    return diffs


def split_seconds(run: dict[str, Any]) -> dict[str, float | None]:
    """Mean seconds of the rounds after the first, with and without evaluation."""
    rounds = run["records"][1:]
    split: dict[str, float | None] = {}
    for name, evaluated in (("evaluated", True), ("not_evaluated", False)):
        secs = [r["seconds"] for r in rounds
                if (r.get("local_accuracy") is not None
                    or r.get("meme_accuracy") is not None) == evaluated]
        split[name] = sum(secs) / len(secs) if secs else None
    return split


def profile_table(phases: list[dict[str, Any]], rounds: list[int], workers: int,
                  ) -> list[tuple[str, float, str]]:
    """(phase, seconds per round, note) averaged over ``rounds``."""
    server: dict[str, float] = defaultdict(float)
    client: dict[str, float] = defaultdict(float)
    for p in phases:
        if p["round"] in rounds:
            (server if p["role"] == "server" else client)[p["phase"]] += p["seconds"] / len(rounds)
    rows = [(name, server[name], "server clock") for name in SERVER_PHASES]
    for exchange, prefix in (("train-exchange", "train."), ("evaluate-exchange", "evaluate.")):
        busy = 0.0
        for name in sorted(k for k in client if k.startswith(prefix)):
            busy += client[name]
            rows.append((f"  {name}", client[name] / workers,
                         f"clients' summed {client[name]:.1f} s / {workers} workers"))
        rows.append((f"  {exchange}: messaging, scheduling, idle workers",
                     server[exchange] - busy / workers, "the exchange's rest"))
    return rows


def main() -> None:
    """Run the variants, print the comparison and the profile, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-ref", required=True, help="commit to compare against")
    p.add_argument("--preset", default="leaderboard-fmnist-dir0.1")
    p.add_argument("--algorithm", default="fml")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-threads", action="store_true", help="skip 1 client x 2 threads")
    p.add_argument("--option", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="a variant of this tree with these run-config keys (TOML values)")
    p.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "round.json")
    a = p.parse_args()
    preset, clients = load_preset(a.preset)
    run_config = {**preset, "algorithm": a.algorithm, "seed": a.seed,
                  "num-server-rounds": a.rounds}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedmutual-bench-round-") as tmp:
        base_app = Path(tmp) / "baseline"
        commit = export_commit(a.baseline_ref, base_app)
        variants = [(f"baseline {commit[:7]}, 2 clients x 1 thread", base_app, 1, {}),
                    ("this tree, 2 clients x 1 thread", ROOT, 1, {})]
        if not a.no_threads:
            variants.append(("this tree, 1 client x 2 threads", ROOT, 2, {}))
        for items in a.option:
            variants.append((f"this tree + {' '.join(items)}, 2 clients x 1 thread", ROOT, 1,
                             overrides(items, "--option")))
        for i, (name, app, cpus, extra) in enumerate(variants):
            marker = Path(tmp) / f"marker{i}"  # this tree's code writes phases here
            # the baseline may predate FML's `auto` keys (issue #24) and then ran the
            # paper's FML: this tree runs the same work, or the metrics could not agree
            pinned = {**paper_keys(), **extra} if app == ROOT else extra
            results[name] = timed_run(app, {**run_config, **pinned}, clients, cpus,
                                      Path(tmp) / f"run{i}",
                                      env={ENV: str(marker)} if app != ROOT else None)
            if app != ROOT:
                results[name]["ran_profiler"] = bool(read_phases(marker))
            print(f"{name}: {results[name]['per_round']:.1f} s/round after round 1 "
                  f"(rounds: {', '.join(f'{s:.1f}' for s in results[name]['seconds'])})",
                  flush=True)
        profile = None
        if not a.no_profile:
            folder = Path(tmp) / "profile"
            run = timed_run(ROOT, run_config, clients, 1, Path(tmp) / "run-profile",
                            env={ENV: str(folder)})
            profile = profile_table(read_phases(folder), list(range(2, a.rounds + 1)), 2)
            profile = [("round (metrics.json seconds)", run["per_round"], "")] + profile
    base = results[variants[0][0]]
    if base["ran_profiler"]:
        print("note: the baseline run wrote profile phases: either the baseline has the "
              "profiler, or it ran this tree's modules (then the comparison is void)")
    print(f"\n{a.preset}, {a.algorithm}, seed {a.seed}, {a.rounds} rounds\n")
    print("| code | placement | s/round | speed-up | metrics equal to the baseline |")
    print("|---|---|---|---|---|")
    summary = []
    for name, _, cpus, extra in variants:
        r = results[name]
        diffs = differences(base, r, recorded_only=bool(extra))
        code, placement = name.split(", ")
        split = split_seconds(r)
        summary.append({"variant": name, "cpus_per_client": cpus, "options": extra,
                        "seconds": r["seconds"], "seconds_per_round": r["per_round"],
                        "seconds_split": split,
                        "speedup": base["per_round"] / r["per_round"], "differences": diffs})
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in split.items()
                          if v is not None and extra)
        print(f"| {code} | {placement} | {r['per_round']:.1f}{f' ({parts})' if parts else ''} "
              f"| {base['per_round'] / r['per_round']:.2f}x | "
              f"{'yes' if not diffs else f'no: {len(diffs)} differ, e.g. {diffs[0]}'} |")
    if profile:
        print(f"\nProfile of this tree (2 clients x 1 thread), mean of rounds 2-{a.rounds}:\n")
        print("| phase | s/round | |\n|---|---|---|")
        for name, secs, note in profile:
            print(f"| {name} | {secs:.2f} | {note} |")
    save_benchmark(a.json, {"benchmark": "round", "preset": a.preset, "algorithm": a.algorithm,
                            "seed": a.seed, "rounds": a.rounds, "baseline": commit,
                            "variants": summary, "profile": profile})


if __name__ == "__main__":
    main()
