#!/usr/bin/env bash
# Copy the finished compression runs' records (metrics, config, clients JSON; no weights) into
# RESULTS_DIR/<mode>/<preset>/fml-seed<N>/ for `python -m simulations.compression_report`.
#   bash simulations/compression/collect.sh OUT_OF_RUN_SH RESULTS_DIR
set -eu
SRC=${1:-outputs/compression}
DST=${2:-simulations/results/compression-10rounds}
for run in "$SRC"/*/*/fml-seed*; do
  [ -f "$run/metrics.json" ] || continue
  rounds=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$run/metrics.json")
  want=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num-server-rounds'])" "$run/config.json")
  [ "$rounds" = "$want" ] || continue  # unfinished
  rel=${run#"$SRC"/}
  mkdir -p "$DST/$rel"
  cp "$run"/metrics.json "$run"/config.json "$run"/clients.json "$DST/$rel/"
done
echo "collected into $DST"
