"""Run algorithms x presets x seeds through the real Flower simulation, one after another.

    python -m simulations.grid --presets fmnist-dir0.1 fmnist-pathological \\
        --algorithms fml fedavg fedprox local --seeds 0 1 2 --out outputs/grid \\
        [--set num-server-rounds=30]

An algorithm may also be a variant: ``simulations/variants/<name>.toml`` names its
``algorithm`` and the keys it sets (``fml-k2``: FML with two private peers), on top of the
preset. Each run writes ``<out>/<preset>/<algorithm or variant>-seed<seed>/``. A run
whose ``metrics.json`` already has every round is skipped; one that was interrupted
continues from its checkpoint (``resume-from``), so re-running the same command resumes
the grid; a folder whose recorded config is not the one the grid would run there now is
refused before anything runs (:func:`stale_cells`). Runs with private models keep them in
``<run>/private-state/`` (``state-dir``), so a resumed run continues them instead of
starting fresh ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import Algorithm, ConfigError, config_changes, load_config
from common.flwr_local import ROOT, SimLink

PRESETS = ROOT / "simulations" / "presets"
VARIANTS = ROOT / "simulations" / "variants"


def load_preset(name: str) -> tuple[dict[str, Any], int]:
    """A preset's run-config overrides (validated) and its number of simulated clients."""
    path = PRESETS / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.toml") if p.stem != "supernodes")
        raise SystemExit(f"unknown preset {name!r}: expected one of {', '.join(known)}")
    overrides = tomllib.loads(path.read_text())
    base = overrides.pop("extends", None)
    if base is not None:  # a variant: the base preset's keys, then its own
        base_overrides, base_clients = load_preset(str(base))
        overrides = {**base_overrides, **overrides}
    load_config(overrides)  # fail now, not after an hour of other runs
    clients = tomllib.loads((PRESETS / "supernodes.toml").read_text())
    if name in clients:
        return overrides, int(clients[name])
    if base is not None:
        return overrides, base_clients
    raise SystemExit(f"{PRESETS / 'supernodes.toml'} has no client count for {name!r}")


def load_variant(name: str) -> tuple[str, dict[str, Any]]:
    """The algorithm a grid name runs and the keys it sets: a registered algorithm as it
    is, or a variant file (its ``algorithm`` and overrides)."""
    if name in {a.value for a in Algorithm}:
        return name, {}
    path = VARIANTS / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in VARIANTS.glob("*.toml"))
        raise SystemExit(f"unknown algorithm or variant {name!r}: expected one of "
                         f"{', '.join(a.value for a in Algorithm)}, or a variant "
                         f"({', '.join(known)}) in {VARIANTS}")
    keys = tomllib.loads(path.read_text())
    algorithm = keys.get("algorithm")
    if algorithm not in {a.value for a in Algorithm}:
        raise SystemExit(f"{path}: 'algorithm' = {algorithm!r}, expected one of "
                         f"{', '.join(a.value for a in Algorithm)}")
    return algorithm, keys


def paper_keys() -> dict[str, Any]:
    """FML's keys as the paper (and every ``fml`` run before issue #24's defaults) ran them:
    ``fml-paper``'s, so the scripts that reproduce those results pin them from one file."""
    return {k: v for k, v in load_variant("fml-paper")[1].items() if k != "algorithm"}


@dataclass
class Job:
    """One cell of the grid."""

    preset: str
    algorithm: str
    seed: int
    out: Path

    @property
    def run_dir(self) -> Path:
        return self.out / self.preset / f"{self.algorithm}-seed{self.seed}"

    @property
    def state_dir(self) -> Path:
        """Where the run's clients keep their private models, so a resume continues them."""
        return self.run_dir / "private-state"

    def rounds_done(self) -> int:
        try:
            return len(json.loads((self.run_dir / "metrics.json").read_text()))
        except (OSError, ValueError):
            return 0


def set_aside_unfinished_state(job: Job) -> Path | None:
    """Before a fresh start: private state left by an attempt that was stopped before its
    first checkpoint belongs to no round the server kept, and clients rightly refuse it
    (it is newer than the server's round 0). It is moved aside to
    ``private-state.unfinished``, not deleted; returns where it went, or None."""
    if not job.state_dir.exists():
        return None
    aside = job.state_dir.with_name("private-state.unfinished")
    if aside.exists():
        shutil.rmtree(aside)
    job.state_dir.rename(aside)
    print(f"{job.run_dir}: no checkpoint, so its private state from an unfinished first "
          f"round was moved to {aside}", flush=True)
    return aside


def _progress(job: Job, index: int, total: int, rounds: int, stop: threading.Event,
              started: float, grid_eta) -> None:
    seen = job.rounds_done()
    while not stop.wait(2.0):
        done = job.rounds_done()
        if done != seen and done > 0:
            seen = done
            per_round = (time.time() - started) / max(done, 1)
            eta = per_round * (rounds - done)
            print(f"[{index}/{total}] {job.preset} {job.algorithm} seed {job.seed}: round "
                  f"{done}/{rounds} ({per_round:.1f} s/round, run ETA {eta / 60:.1f} min, "
                  f"grid ETA {grid_eta(eta, per_round * rounds) / 60:.0f} min)", flush=True)


def _run_config(job: Job, preset_cfg: dict[str, Any], extra: dict[str, Any],
                variant: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """What one cell runs: the preset, ``--set``, the variant's keys, then the cell's own."""
    algorithm, keys = variant
    return {**preset_cfg, **extra, **keys, "algorithm": algorithm, "seed": job.seed,
            "output-dir": str(job.out / job.preset), "run-name": job.run_dir.name}


def stale_cells(jobs: Sequence[tuple[Job, dict[str, Any]]]) -> list[str]:
    """The cells whose folder holds a run of another config than the one the grid would run
    there now (a default changed since, another ``--set``): skipping or resuming one would
    count it under a name it no longer means. Each as "<run dir>: <differences>"."""
    out = []
    for job, run_config in jobs:
        recorded = job.run_dir / "config.json"
        if not recorded.is_file():
            continue
        try:
            then = json.loads(recorded.read_text())
        except ValueError as exc:
            out.append(f"{job.run_dir}: unreadable config.json ({exc})")
            continue
        changes = config_changes(then, load_config(run_config))
        if changes:
            out.append(f"{job.run_dir}: {', '.join(changes)}")
    return out


def run_grid(presets: Sequence[str], algorithms: Sequence[str], seeds: Sequence[int],
             out: Path, cpus_per_client: int = 1, gpus_per_client: float = 0,
             extra: dict[str, Any] | None = None) -> list[Job]:
    """Run every missing cell; returns the jobs (run folders under ``out``). Refuses, before
    running anything, a grid whose folders hold runs of another config (:func:`stale_cells`)."""
    out, extra = out.resolve(), extra or {}
    cells = [(p, *load_preset(p)) for p in presets]
    variants = {a: load_variant(a) for a in algorithms}
    jobs = [(job, _run_config(job, cfg, extra, variants[a]), n) for p, cfg, n in cells
            for s in seeds for a in algorithms for job in [Job(p, a, s, out)]]
    for job, run_config, _ in jobs:  # fail now, not after an hour of other runs
        try:
            load_config(run_config)
        except ConfigError as exc:
            raise SystemExit(f"{job.preset} {job.algorithm} (--set {extra}): {exc}") from None
    stale = stale_cells([(job, run_config) for job, run_config, _ in jobs])
    if stale:
        raise SystemExit("these grid folders hold runs of another config than this grid's "
                         "(move them aside, or name the config they ran with a variant):\n  "
                         + "\n  ".join(stale))
    durations: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fedmutual-grid-") as home, SimLink(Path(home)) as link:
        for i, (job, run_config, clients) in enumerate(jobs, start=1):
            rounds = int(run_config.get("num-server-rounds", 5))
            if job.rounds_done() >= rounds:
                print(f"[{i}/{len(jobs)}] {job.preset} {job.algorithm} seed {job.seed}: done, "
                      "skipped", flush=True)
                continue
            if Algorithm(run_config["algorithm"]).trains_local:  # private models survive a resume
                run_config["state-dir"] = str(job.state_dir)
            if (job.run_dir / "checkpoint.pt").exists():
                run_config["resume-from"] = str(job.run_dir)
                print(f"[{i}/{len(jobs)}] resuming {job.run_dir} after round "
                      f"{job.rounds_done()}", flush=True)
            else:
                set_aside_unfinished_state(job)
                print(f"[{i}/{len(jobs)}] {job.preset} {job.algorithm} seed {job.seed}: start",
                      flush=True)
            remaining_jobs = len(jobs) - i

            def grid_eta(run_eta: float, run_total: float,
                         remaining_jobs: int = remaining_jobs) -> float:
                avg = sum(durations) / len(durations) if durations else run_total
                return run_eta + remaining_jobs * avg

            started, stop = time.time(), threading.Event()
            watcher = threading.Thread(target=_progress, daemon=True, args=(
                job, i, len(jobs), rounds, stop, started, grid_eta))
            watcher.start()
            log_path = job.out / job.preset / f"{job.run_dir.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w") as log:
                subprocess.run(link.command(run_config, clients, cpus_per_client,
                                            gpus_per_client),
                               env=link.env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=link.home, check=False)
            stop.set()
            watcher.join()
            durations.append(time.time() - started)
            if job.rounds_done() < rounds:
                raise SystemExit(f"run {job.run_dir} stopped after {job.rounds_done()} of "
                                 f"{rounds} rounds; see {log_path}")
            summary = [ln for ln in log_path.read_text().splitlines() if "summary" in ln]
            print(f"[{i}/{len(jobs)}] {summary[-1] if summary else 'finished'} "
                  f"({durations[-1] / 60:.1f} min)", flush=True)
    return [j for j, _, _ in jobs]


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command line and its run-config overrides: every ``--set`` counts (repeated
    flags add up, as a user would expect; ``--set a=1 b=2`` works too)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", required=True)
    p.add_argument("--algorithms", nargs="+", default=[a.value for a in Algorithm],
                   help="registered algorithms or variants (simulations/variants/*.toml)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "grid")
    p.add_argument("--cpus-per-client", type=int, default=1,
                   help="whole CPUs per simulated client (Flower 1.42 takes integers only)")
    p.add_argument("--gpus-per-client", type=float, default=0)
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="run-config overrides on top of every preset (TOML values)")
    a = p.parse_args(argv)
    return a, overrides(a.set, "--set")


def overrides(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` items as run-config values, each VALUE in TOML (strings in double
    quotes, so ``local-models="mlp,cnn"`` stays one value); a key given again takes its
    last value, as a command line's later flag wins; a bad item names ``flag``."""
    out: dict[str, Any] = {}
    for item in items:
        try:
            out.update(tomllib.loads(item))
        except tomllib.TOMLDecodeError as exc:
            raise SystemExit(f"{flag} {item!r}: expected KEY=VALUE with TOML values "
                             f"(strings in double quotes): {exc}") from None
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -m simulations.grid``."""
    a, extra = parse_args(argv)
    # SIGTERM (kill, CI, a closing session) must still end our SuperLink and its Ray
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_grid(a.presets, a.algorithms, a.seeds, a.out, a.cpus_per_client, a.gpus_per_client,
             extra)


if __name__ == "__main__":
    sys.exit(main())
