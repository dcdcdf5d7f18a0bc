#!/usr/bin/env bash
# Issue #11 screening, third batch: the teacher renormalised over the client's own classes
# (the meme put 16 % of its mass on classes the clients never see: simulations.teacher_mass).
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/screen}
P=leaderboard-fmnist-dir0.1
g() { name=$1; shift; python -m simulations.grid --presets $P --seeds 0 --out "$OUT/$name" "$@"; }
g seen --algorithms fml --set num-server-rounds=10 'distill-prior="seen"'
g seen-additive --algorithms fml --set num-server-rounds=10 'distill-prior="seen"' 'distill-weighting="additive"'
