#!/usr/bin/env bash
# Issue #11 finalists on the leaderboard protocol (20 rounds), in priority order:
# local-only and the new default FML (additive weighting, now the schema default) with
# 3 seeds, FedAvg (the meme's yardstick) with one seed first; then the other FedAvg seeds
# and today's FML (convex weighting); last, the default FML with the speed keys (#14).
# Re-running resumes (the grid skips finished runs and
# resumes interrupted ones).
#   bash simulations/finalists/run.sh [OUT]   (default outputs/finalists)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/finalists}
D=leaderboard-fmnist-dir0.1
P=leaderboard-fmnist-pathological
# FML as these results ran it, the paper's (simulations/variants/fml-paper.toml): `fml`
# alone now takes the defaults the payoff map chose (issue #24)
g() { name=$1; preset=$2; seed=$3; shift 3
      python -m simulations.grid --presets "$preset" --seeds "$seed" --out "$OUT/$name" \
        --set 'personal-model="private"' meme-epochs=0 "$@"; }
pair() { g local "$1" "$2" --algorithms local
         g additive "$1" "$2" --algorithms fml --set 'distill-weighting="additive"'; }
pair $D 0; pair $D 1; pair $D 2
g fedavg $D 0 --algorithms fedavg
pair $P 0
g fedavg $P 0 --algorithms fedavg
pair $P 1; pair $P 2
for S in 1 2; do g fedavg $D $S --algorithms fedavg; g fedavg $P $S --algorithms fedavg; done
for S in 0 1 2; do
  for X in $D $P; do g convex $X $S --algorithms fml --set 'distill-weighting="fixed"'; done
done
# #14: the opt-in keys that change the numbers for speed (bf16 forward passes, compiled
# training, evaluation every 5th round), against the default FML above
for X in $D $P; do
  for S in 0 1 2; do
    g fast $X $S --algorithms fml --set 'precision="bf16"' evaluate-every=5 torch-compile=true
  done
done
