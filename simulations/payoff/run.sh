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
# FedAvg's. Order: what the ranking of the default needs first (the finalist fml-mix-meme2
# on the pathological control, the 200-client regime with its baselines, fml-tuned-meme2
# where fml-mix-meme2 ran), then Ditto and the variants still unmeasured; then the
# finalists and the map's baselines on seed 0 of every preset and control; then seeds 1-2;
# then the rest of the controls
SEED0="local fedavg-ft fml-mix-meme2 fedavg3-ft fml-tuned-meme2 ditto fml-paper fml-mix-m05 fedavgm-ft fml-mix-warm fml-mix-meme2-hid"
FINAL="local fedavg-ft fml-mix-meme2 fedavg3-ft ditto fml-paper"
CONTROL="fml-mix-meme2 fedavg-ft fedavg3-ft ditto fml-tuned-meme2"
g() { python -m simulations.grid --presets "$1" --seeds "$2" --out "$OUT" --algorithms $3; }
# the cells already committed are not run again (the grid skips a run whose metrics.json
# has every round; nothing there is overwritten)
mkdir -p "$OUT"
for d in simulations/results/payoff-map/*/; do
  [ "$(basename "$d")" = map ] || cp -rn "$d" "$OUT"/
done
g leaderboard-fmnist-pathological 0 "fml-mix-meme2"
g payoff-fmnist-200-dir0.3 0 "local fml-mix-meme2 fedavg-ft fedavg3-ft fml-tuned-meme2"
g payoff-fmnist-100-dir1.0 0 "fml-tuned-meme2"
g payoff-fmnist-100-dir0.5 0 "fml-mix-meme2-hid ditto fml-paper fedavgm-ft"
g payoff-fmnist-100-dir1.0 0 "$SEED0"
g leaderboard-fmnist-dir0.1 0 "$CONTROL"
g payoff-fmnist-200-dir0.3 0 "$SEED0"
for S in 1 2; do
  for P in payoff-fmnist-100-dir0.5 payoff-fmnist-100-dir1.0 payoff-fmnist-200-dir0.3; do
    g "$P" "$S" "$FINAL"
  done
done
# the controls, where training alone is at its ceiling (20 rounds, the leaderboard protocol)
for S in 0 1 2; do
  for P in leaderboard-fmnist-dir0.1 leaderboard-fmnist-pathological; do
    g "$P" "$S" "$CONTROL"
  done
done
