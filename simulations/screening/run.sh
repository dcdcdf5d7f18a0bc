#!/usr/bin/env bash
# Issue #11 screening: leaderboard-fmnist-dir0.1, seed 0, 10 rounds, one variant per folder.
# Re-running resumes (the grid skips finished runs and resumes interrupted ones).
#   bash simulations/screening/run.sh [OUT]   (default outputs/screen)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/screen}
P=leaderboard-fmnist-dir0.1
# FML as these results ran it: the paper's keys (simulations/variants/fml-paper.toml;
# `fml` alone now takes the defaults the payoff map chose, issue #24) and the distillation
# weighting then the default; a cell's own --set comes later and wins
g() { name=$1; shift; python -m simulations.grid --presets $P --seeds 0 --out "$OUT/$name" \
        --set 'personal-model="private"' meme-epochs=0 'distill-weighting="fixed"' "$@"; }
g baseline --algorithms local fml --set num-server-rounds=10
g prior --algorithms fml --set num-server-rounds=10 'distill-prior="client"'
g gate-correct --algorithms fml --set num-server-rounds=10 'distill-gate="correct"'
g adaptive --algorithms fml --set num-server-rounds=10 'distill-weighting="adaptive"'
g alpha0.9 --algorithms fml --set num-server-rounds=10 alpha=0.9
g warmup3 --algorithms fml --set num-server-rounds=10 warmup-rounds=3
g fedavg --algorithms fedavg --set num-server-rounds=10
