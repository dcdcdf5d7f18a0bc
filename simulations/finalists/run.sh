#!/usr/bin/env bash
# Issue #11 finalists on the leaderboard protocol (20 rounds), in priority order:
# local-only and the new default FML (additive weighting, now the schema default) on both presets, 3 seeds;
# then FedAvg (the meme's yardstick) and today's FML (convex weighting).
# Re-running resumes (the grid skips finished runs and resumes interrupted ones).
#   bash simulations/finalists/run.sh [OUT]   (default outputs/finalists)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/finalists}
g() { name=$1; preset=$2; seed=$3; shift 3
      python -m simulations.grid --presets "$preset" --seeds "$seed" --out "$OUT/$name" "$@"; }
for P in leaderboard-fmnist-dir0.1 leaderboard-fmnist-pathological; do
  for S in 0 1 2; do
    g local "$P" "$S" --algorithms local
    g additive "$P" "$S" --algorithms fml --set 'distill-weighting="additive"'
  done
done
for S in 0 1 2; do
  for P in leaderboard-fmnist-dir0.1 leaderboard-fmnist-pathological; do
    g fedavg "$P" "$S" --algorithms fedavg
  done
done
for S in 0 1 2; do
  for P in leaderboard-fmnist-dir0.1 leaderboard-fmnist-pathological; do
    g convex "$P" "$S" --algorithms fml --set 'distill-weighting="fixed"'
  done
done
