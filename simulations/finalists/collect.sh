#!/usr/bin/env bash
# Copy the finished finalists' records (metrics, config, clients JSON; no weights) into one
# grid-shaped folder for `python -m simulations.report`: the default FML of then (additive;
# the paper's keys, which reports name "fml-paper") as "fml", today's convex FML as "fmlconvex", the default FML with the speed keys as
# "fmlfast", local and fedavg as themselves.
#   bash simulations/finalists/collect.sh OUT_OF_RUN_SH RESULTS_DIR
set -eu
SRC=${1:-outputs/finalists}
DST=${2:-simulations/results/leaderboard-20rounds}
for pair in local:local additive:fml fedavg:fedavg convex:fmlconvex fast:fmlfast; do
  variant=${pair%%:*}; algo=${pair##*:}
  for run in "$SRC/$variant"/*/*-seed*; do
    [ -f "$run/metrics.json" ] || continue
    preset=$(basename "$(dirname "$run")"); seed=${run##*-seed}
    rounds=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$run/metrics.json")
    want=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num-server-rounds'])" "$run/config.json")
    [ "$rounds" = "$want" ] || continue  # unfinished
    mkdir -p "$DST/$preset/$algo-seed$seed"
    cp "$run"/metrics.json "$run"/config.json "$run"/clients.json "$DST/$preset/$algo-seed$seed/"
  done
done
echo "collected into $DST"
