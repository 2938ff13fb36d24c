#!/bin/bash
# End-to-end check of the experiment runner and the analyses on the tiny
# grid bench/grids/papers_quick.json (2 variants, 1 seed, 20 steps):
# bench/experiments.py trains, evaluates and routes every run, writes the
# results table and plots; a second invocation must skip every finished
# run; bench/analyze.py writes its four tables and PNGs.
#
#   experiments_test.sh MOTLEY_BINARY SOURCE_DIR
# Exit 77 (skipped) without the Brown token files or a Python with numpy,
# h5py and matplotlib.
set -euo pipefail
motley=$1
src=$2
cd "$src"
if [[ ! -f data-cache/brown/train.h5 || ! -f data-cache/brown/valid.h5 ]]; then
  echo "SKIP: data-cache/brown/{train,valid}.h5 missing (scripts/fetch_brown.sh)"
  exit 77
fi
py=""
for cand in "${PYTHON:-}" python3 /usr/bin/python3; do
  [[ -n "$cand" ]] || continue
  if "$cand" -c 'import numpy, h5py, matplotlib' 2>/dev/null; then py=$cand; break; fi
done
if [[ -z "$py" ]]; then
  echo "SKIP: no python3 with numpy, h5py and matplotlib"
  exit 77
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export OPENBLAS_NUM_THREADS=1

"$py" bench/experiments.py bench/grids/papers_quick.json --motley "$motley" --out "$out" \
  > "$out/first.log" 2>&1 || { cat "$out/first.log"; exit 1; }
for f in results.md results.csv eval_bpb.png curves.png \
         baseline/seed1/result.json modse/seed1/result.json \
         baseline/seed1/route/step_10.h5 modse/seed1/route/step_20.h5; do
  [[ -s "$out/$f" ]] || { echo "missing $f"; cat "$out/first.log"; exit 1; }
done
grep -q '| MoDSE | modse | 1 |' "$out/results.md" || { cat "$out/results.md"; exit 1; }

# idempotent: everything finished is skipped, nothing is trained again
"$py" bench/experiments.py bench/grids/papers_quick.json --motley "$motley" --out "$out" \
  > "$out/second.log" 2>&1 || { cat "$out/second.log"; exit 1; }
if grep -q '^\[experiments\] train ' "$out/second.log"; then
  echo "second invocation trained again:"; cat "$out/second.log"; exit 1
fi
[[ $(grep -c '^\[experiments\] skip ' "$out/second.log") == 2 ]] || { cat "$out/second.log"; exit 1; }

"$py" bench/analyze.py bench/grids/papers_quick.json --root "$out" > "$out/analyze.log" 2>&1 \
  || { cat "$out/analyze.log"; exit 1; }
for a in difficult load stability rmoe; do
  [[ -s "$out/analysis/$a.md" && -s "$out/analysis/$a.png" ]] \
    || { echo "missing analysis $a"; cat "$out/analyze.log"; exit 1; }
done

# the route file's mean CE is the eval loss of the same checkpoint
"$py" - "$out" <<'PY'
import json, sys, h5py
out = sys.argv[1]
res = json.load(open(f"{out}/modse/seed1/result.json"))
with h5py.File(f"{out}/modse/seed1/route/step_20.h5") as f:
    ce = f["ce"][:].astype("float64").mean()
    assert f["layers/0/probs"].shape[1] == 4
    assert abs(f["layers/0/probs"][:].sum(1) - 1).max() < 1e-4
assert abs(ce - res["eval_loss"]) < 1e-4, (ce, res["eval_loss"])
print("route mean CE", ce, "== eval_loss", res["eval_loss"])
PY
echo "experiments_test: OK"
