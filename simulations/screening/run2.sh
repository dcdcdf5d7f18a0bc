#!/usr/bin/env bash
# Issue #11 screening, in priority order after the first results (same protocol as
# run.sh: leaderboard-fmnist-dir0.1, seed 0, 10 rounds). Re-running resumes.
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/screen}
P=leaderboard-fmnist-dir0.1
# FML as these results ran it: the paper's keys (simulations/variants/fml-paper.toml;
# `fml` alone now takes the defaults the payoff map chose, issue #24) and the distillation
# weighting then the default; a cell's own --set comes later and wins
g() { name=$1; shift; python -m simulations.grid --presets $P --seeds 0 --out "$OUT/$name" \
        --set 'personal-model="private"' meme-epochs=0 'distill-weighting="fixed"' "$@"; }
g seen --algorithms fml --set num-server-rounds=10 'distill-prior="seen"'
g additive --algorithms fml --set num-server-rounds=10 'distill-weighting="additive"'
g alpha0.9 --algorithms fml --set num-server-rounds=10 alpha=0.9
g mix --algorithms fml --set num-server-rounds=10 personal-mix=true
g seen-additive --algorithms fml --set num-server-rounds=10 'distill-prior="seen"' 'distill-weighting="additive"'
g gate-correct --algorithms fml --set num-server-rounds=10 'distill-gate="correct"'
g adaptive --algorithms fml --set num-server-rounds=10 'distill-weighting="adaptive"'
g fedavg --algorithms fedavg --set num-server-rounds=10
g warmup3 --algorithms fml --set num-server-rounds=10 warmup-rounds=3
