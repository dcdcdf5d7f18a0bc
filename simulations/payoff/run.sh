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
# FedAvg's. First the fair baseline of the best FML cell so far (fedavgm-ft: FedAvg+FT with
# fml-mix-m05's server momentum) and the last variant of item 3 on the first preset, then
# every algorithm and variant on seed 0 of the other presets, then seeds 1-2 of the
# finalists, then the 20-client controls
SEED0="fedavg-ft local fml-mix-m05 fedavgm-ft fml-mix-warm fml-mix fml ditto fml-tuned fml-choice"
FINAL="fedavg-ft local fml-mix-m05 fedavgm-ft fml ditto"
g() { python -m simulations.grid --presets "$1" --seeds "$2" --out "$OUT" --algorithms $3; }
g payoff-fmnist-100-dir0.5 0 "fedavgm-ft fedavg3-ft fml-mix-meme2 ${SEED0/ fedavgm-ft/}"
for P in payoff-fmnist-100-dir1.0 payoff-fmnist-200-dir0.3; do
  g "$P" 0 "$SEED0"
done
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
