#!/usr/bin/env bash
# Issue #23's evidence, in priority order and resumable (the grid skips finished runs and
# resumes interrupted ones): co-distillation exchanging every 1, 2, 5 and 10 rounds against
# FML, FedAvg and local-only, and FML with K = 2 and 3 private peers, 3 seeds each, on the
# 4-client split (co-distillation's own setting), then on the same data, model and
# optimiser over 20 clients.
#   bash simulations/codistill/run.sh [OUT]
#   python -m simulations.report OUT          (tables and figures)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-simulations/results/codistill-20rounds}
CODISTILL="codistill-e1 codistill-e2 codistill-e5 codistill-e10"
PEERS="fml-k2 fml-k3"
# FML as these results ran it, the paper's (simulations/variants/fml-paper.toml): `fml`
# alone now takes the defaults the payoff map chose (issue #24)
g() { python -m simulations.grid --presets "$1" --seeds "$2" --out "$OUT" --algorithms $3 \
        --set 'personal-model="private"' meme-epochs=0; }
for S in 0 1 2; do g codistill-fmnist-4-dir1.0 "$S" "local fedavg fml $CODISTILL $PEERS"; done
for S in 0 1 2; do g codistill-fmnist-20-dir1.0 "$S" "local fedavg fml $CODISTILL"; done
for S in 0 1 2; do g codistill-fmnist-20-dir1.0 "$S" "$PEERS"; done
