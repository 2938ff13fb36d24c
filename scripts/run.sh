#!/usr/bin/env bash
# Sets up, builds and runs motley's main job on this machine: a smoke
# training of a ~5M-parameter MoE with MoDSE experts on the Brown corpus.
#   1. installs the Debian packages motley needs (scripts/setup.sh)
#   2. builds the release preset
#   3. fetches Brown and prepares it (tokenizer + token files), once
#   4. trains configs/smoke.json into runs/smoke (resuming if interrupted)
#   5. evaluates the final checkpoint and plots runs/smoke/metrics.png
# Extra arguments go to `motley train` (e.g. --set train.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/build.sh release --target motley
motley=./build/release/apps/motley

if [ ! -f data-cache/brown/train.h5 ]; then
  bash scripts/fetch_brown.sh data-cache/brown/text
  "$motley" prepare --input data-cache/brown/text --out data-cache/brown --vocab-size 4096
fi

"$motley" train --config configs/smoke.json --run runs/smoke "$@"
"$motley" eval --checkpoint runs/smoke
/usr/bin/python3 scripts/plot_metrics.py runs/smoke
