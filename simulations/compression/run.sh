#!/usr/bin/env bash
# Issue #13 evidence: each compression mode of the client -> server meme update on
# fmnist-dir0.1 (20 clients, 10 rounds, the default FML), 3 seeds, one seed of every mode
# before the next seed (top-k at 25 %: bitmap + int8 values, 10.7x fewer bytes). Re-running
# resumes (the grid skips finished runs).
#   bash simulations/compression/run.sh [OUT]   (default outputs/compression)
# Then: python -m simulations.compression_report OUT
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-outputs/compression}
P=fmnist-dir0.1
# FML as these results ran it, the paper's (simulations/variants/fml-paper.toml): `fml`
# alone now takes the defaults the payoff map chose (issue #24)
g() { name=$1; seed=$2; shift 2
      python -m simulations.grid --presets $P --seeds "$seed" --algorithms fml \
          --out "$OUT/$name" --set 'personal-model="private"' meme-epochs=0 "$@"; }
for S in 0 1 2; do
  g none "$S"
  g fp16 "$S" --set 'compression="fp16"'
  g int8 "$S" --set 'compression="int8"'
  g topk0.25 "$S" --set 'compression="topk"' 'compression-ratio=0.25'
  g svd0.95 "$S" --set 'compression="svd"' 'compression-energy=0.95'
done
