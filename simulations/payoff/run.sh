#!/usr/bin/env bash
# Issue #24, the payoff map, in priority order: seed 0 of every algorithm on the data-scarce
# presets first (the baselines and FML's personal-model variants, simulations/variants/),
# then seeds 1-2 of the finalists, then the 20-client controls. Re-running resumes (the
# grid skips finished runs and resumes interrupted ones from their checkpoints).
#   bash simulations/payoff/run.sh [OUT]   (default outputs/payoff)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/payoff}
# FedAvg+FT trains exactly as FedAvg (fine-tuning touches a copy), so its global model is
# FedAvg's; every FML variant is tried on seed 0, the rest run the finalists
SEED0="fedavg-ft local fml-mix fml ditto fml-tuned fml-choice"
FINAL="fedavg-ft local fml-mix-m05 fedavgm-ft fml ditto"
g() { python -m simulations.grid --presets "$1" --seeds "$2" --out "$OUT" --algorithms $3; }
for P in payoff-fmnist-100-dir0.5 payoff-fmnist-100-dir1.0 payoff-fmnist-200-dir0.3; do
  g "$P" 0 "$SEED0"
done
# what hands the meme's strength to the client (issue #24, item 3), one seed, one preset
# each; fedavgm-ft is FedAvg+FT with fml-mix-m05's server momentum, its fair baseline
g payoff-fmnist-100-dir0.5 0 "fml-mix-warm fml-mix-m05 fml-mix-meme2 fedavgm-ft"
g payoff-fmnist-200-dir0.3 0 "fml-mix-warm fml-mix-m05"
for S in 1 2; do
  for P in payoff-fmnist-100-dir0.5 payoff-fmnist-100-dir1.0 payoff-fmnist-200-dir0.3; do
    g "$P" "$S" "$FINAL"
  done
done
# the controls, where training alone is at its ceiling (20 rounds, the leaderboard protocol)
for S in 0 1 2; do
  for P in leaderboard-fmnist-dir0.1 leaderboard-fmnist-pathological; do
    g "$P" "$S" "fedavg-ft ditto fml-mix-m05"
  done
done
