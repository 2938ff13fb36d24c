#!/bin/bash
# End-to-end check of the experiment runner and the analyses on the tiny
# grid bench/grids/papers_quick.json (2 variants, 1 seed, 20 steps):
# bench/experiments.py trains, evaluates and routes every run, writes the
# results table and plots; a second invocation must skip every finished
# run; bench/analyze.py writes its four tables and PNGs.
#
#   experiments_test.sh MOTLEY_BINARY SOURCE_DIR
# The data is generated here (a seeded pseudo-text of 300 documents, about
# 0.4 MB, through `motley prepare` with a 512-token vocabulary) and the
# grid's runs are pointed at it, so the test needs no corpus download.
# Exit 77 (skipped) without a Python with numpy, h5py and matplotlib.
set -euo pipefail
motley=$1
src=$2
cd "$src"
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

# ---- data and grid ---------------------------------------------------------------
"$py" - "$out/corpus.jsonl" <<'PY'
import json, random, sys
rng = random.Random(7)
syllables = ["ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "de", "vu", "an", "el"]
words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
with open(sys.argv[1], "w") as f:
    for doc in range(300):
        prev, sentences = rng.randrange(300), []
        for _ in range(rng.randint(8, 16)):
            sentence = []
            for _ in range(rng.randint(5, 14)):
                # a word depends on the previous one, so there is something to learn
                prev = (prev * 7 + rng.choice((1, 2, 3, rng.randrange(300)))) % 300
                sentence.append(words[prev])
            sentences.append(" ".join(sentence).capitalize() + ".")
        f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
PY
"$motley" prepare --input "$out/corpus.jsonl" --out "$out/data" --vocab-size 512 \
  > "$out/prepare.log" 2>&1 || { cat "$out/prepare.log"; exit 1; }
grid="$out/papers_quick.json"
"$py" - bench/grids/papers_quick.json "$grid" "$out/data" <<'PY'
import json, sys
grid = json.load(open(sys.argv[1]))
grid["set"].update({"data.train": f"{sys.argv[3]}/train.h5",
                    "data.valid": f"{sys.argv[3]}/valid.h5", "model.vocab_size": 512})
json.dump(grid, open(sys.argv[2], "w"), indent=1)
PY

"$py" bench/experiments.py "$grid" --motley "$motley" --out "$out" \
  > "$out/first.log" 2>&1 || { cat "$out/first.log"; exit 1; }
for f in results.md results.csv eval_bpb.png curves.png \
         baseline/seed1/result.json modse/seed1/result.json \
         baseline/seed1/route/step_10.h5 modse/seed1/route/step_20.h5; do
  [[ -s "$out/$f" ]] || { echo "missing $f"; cat "$out/first.log"; exit 1; }
done
grep -q '| MoDSE | modse | 1 |' "$out/results.md" || { cat "$out/results.md"; exit 1; }

# idempotent: everything finished is skipped, nothing is trained again
"$py" bench/experiments.py "$grid" --motley "$motley" --out "$out" \
  > "$out/second.log" 2>&1 || { cat "$out/second.log"; exit 1; }
if grep -q '^\[experiments\] train ' "$out/second.log"; then
  echo "second invocation trained again:"; cat "$out/second.log"; exit 1
fi
[[ $(grep -c '^\[experiments\] skip ' "$out/second.log") == 2 ]] || { cat "$out/second.log"; exit 1; }

"$py" bench/analyze.py "$grid" --root "$out" > "$out/analyze.log" 2>&1 \
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
