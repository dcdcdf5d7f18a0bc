#!/usr/bin/env bash
# Issue #24, the payoff map, in priority order: seed 0 of every algorithm on the data-scarce
# presets first (FedAvg first: its curve fixes the number of rounds; then the baselines and
# FML's personal-model variants, simulations/variants/), then seeds 1-2, then the 20-client
# controls. Re-running resumes (the grid skips finished runs and resumes
# interrupted ones from their checkpoints).
#   bash simulations/payoff/run.sh [OUT]   (default outputs/payoff)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/payoff}
ALGOS="fedavg fedavg-ft local fml-mix fml ditto fml-choice fml-tuned"
g() { python -m simulations.grid --presets "$1" --seeds "$2" --out "$OUT" --algorithms $ALGOS; }
for S in 0 1 2; do
  for P in payoff-fmnist-100-dir0.5 payoff-fmnist-100-dir1.0 payoff-fmnist-200-dir0.3; do
    g "$P" "$S"
  done
done
# the controls, where training alone is at its ceiling (20 rounds, the leaderboard protocol)
for S in 0 1 2; do
  for P in leaderboard-fmnist-dir0.1 leaderboard-fmnist-pathological; do
    python -m simulations.grid --presets "$P" --seeds "$S" --out "$OUT" \
      --algorithms fedavg-ft ditto fml-mix fml-choice fml-tuned
  done
done
