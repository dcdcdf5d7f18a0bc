#!/usr/bin/env bash
# Issue #11 screening, second batch (same protocol as run.sh): the personal mixture, and
# combinations of the first batch's variants.
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/screen}
P=leaderboard-fmnist-dir0.1
g() { name=$1; shift; python -m simulations.grid --presets $P --seeds 0 --out "$OUT/$name" "$@"; }
g mix --algorithms fml --set num-server-rounds=10 personal-mix=true
g mix-alpha0.9 --algorithms fml --set num-server-rounds=10 personal-mix=true alpha=0.9
g additive --algorithms fml --set num-server-rounds=10 'distill-weighting="additive"'
