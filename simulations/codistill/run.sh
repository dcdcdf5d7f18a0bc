#!/usr/bin/env bash
# Issue #23's evidence, in priority order and resumable (the grid skips finished runs and
# resumes interrupted ones): co-distillation exchanging every 1, 2, 5 and 10 rounds against
# FML, FedAvg and local-only, and FML with K = 2 and 3 private peers; seed 0 first, on the
# 4-client split (co-distillation's own setting), then on the 20-client leaderboard split
# (whose local, fedavg and fml runs, 3 seeds, are already in LEADERBOARD), then seeds 1-2.
#   bash simulations/codistill/run.sh [OUT [LEADERBOARD]]
#   python -m simulations.report OUT          (tables and figures)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-simulations/results/codistill-20rounds}
LEADERBOARD=${2:-simulations/results/leaderboard-20rounds}
NEW="codistill-e1 codistill-e2 codistill-e5 codistill-e10 fml-k2 fml-k3"
g() { python -m simulations.grid --presets "$1" --seeds "$2" --out "$3" --algorithms $4; }
for S in 0 1 2; do
  g codistill-fmnist-4-dir1.0 "$S" "$OUT" "local fedavg fml $NEW"
  g leaderboard-fmnist-dir0.1 "$S" "$LEADERBOARD" "$NEW"
done
