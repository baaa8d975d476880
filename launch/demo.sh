#!/usr/bin/env bash
# The main job: set up (if needed), then train on 2 CPU ranks with Gloo, uncompressed and
# with each compressor, and print accuracy, traffic and compression ratio side by side.
#   bash launch/demo.sh                     # none, fp16, and the paper compressors
#   DEMO_COMPRESSORS="none adacomp" bash launch/demo.sh
#   DEMO_EPOCHS=5 DEMO_RANKS=4 bash launch/demo.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/launch/setup.sh"
venv=${HVDCOMP_VENV:-$repo/.venv}
export PATH="$venv/bin:$PATH"
cd "$repo"
ranks=${DEMO_RANKS:-2}
epochs=${DEMO_EPOCHS:-10}
out=${DEMO_OUT:-results/demo}
mkdir -p "$out"
rm -f "$out"/*.json  # the summary below reads this run's records only
# One launch for all runs: starting the ranks costs more than a short run.
plan="$out/.plan.json"
python -m launch.demo_list "$epochs" "$out" ${DEMO_COMPRESSORS:-} > "$plan"
echo "== horovodrun -np $ranks -H localhost:$ranks --gloo python -m launch.run_many $plan"
echo "   (python -m launch.train --compression NAME --epochs $epochs, for each compressor in turn)"
horovodrun -np "$ranks" -H "localhost:$ranks" --gloo python -m launch.run_many "$plan" 2>&1 \
  | sed -n 's/^\[0\]<stdout>://p'
python -m launch.summarize "$out"/*.json
