#!/usr/bin/env bash
# The GPU check of motley, in one call on a machine with an NVIDIA GPU
# where only CUDA, CMake and Python are installed (under 10 minutes):
#   1. the binaries: from build/gpu-bundle.tar.xz (scripts/gpu_bundle.sh,
#      made on a machine with motley's dependencies and carried over), or
#      built here when the dependencies are present;
#   2. the gpu-labelled tests: the CUDA backend against the CPU backend,
#      and the trainer on CUDA (20 steps against the CPU, dp2/ep2 with one
#      GPU per rank when there are two, checkpoints between GPU and CPU);
#   3. motley bench on cuda for configs/bench.json (f32 and bf16) and the
#      large config of docs/perf_torch.md (bf16), next to
#      bench/torch_bench.py --device cuda --dtype bf16 --compile where
#      PyTorch is importable;
#   4. every figure and verdict into one file: $OUT/gpu_check.txt
#      (OUT defaults to gpu-check-out/).
# Nothing here stops at the first failure: each part records its status.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
report="$OUT/gpu_check.txt"
: >"$report"
say() { echo "$*" | tee -a "$report"; }
# run NAME TIMEOUT CMD...: runs with a deadline, output to $OUT/NAME.log,
# status into the report.
run() {
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  say "[$name] exit $rc after $((SECONDS - t0)) s ($*)"
  if [ $rc -ne 0 ]; then tail -3 "$OUT/$name.log" | sed "s/^/  $name: /" | tee -a "$report"; fi
  return $rc
}

say "motley GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$report"
else
  say "gpu: nvidia-smi not found"
fi
say "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"

# ---- 1. binaries ---------------------------------------------------------------
if [ ! -x build/gpu-bundle/bin/motley ] && [ -f build/gpu-bundle.tar.xz ]; then
  tar -C build -xJf build/gpu-bundle.tar.xz
fi
if [ -x build/gpu-bundle/bin/motley ]; then
  bin=build/gpu-bundle/bin
  export LD_LIBRARY_PATH="$PWD/build/gpu-bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  say "binaries: the carried bundle (build/gpu-bundle)"
else
  say "binaries: building (no build/gpu-bundle)"
  if run build 420 bash -c 'cmake --preset release >/dev/null && cmake --build --preset release -j "$(nproc)"'; then
    bin=build/release
  else
    say "build failed (see $OUT/build.log): motley's dependencies (MPI, HDF5, OpenBLAS, Abseil, GoogleTest) are not here; carry build/gpu-bundle made by scripts/gpu_bundle.sh"
    exit 1
  fi
fi
find_bin() { if [ -x "$bin/$1" ]; then echo "$bin/$1"; else find "$bin" -name "$1" -type f | head -1; fi; }
motley="$(find_bin motley)"
"$motley" --help >/dev/null 2>&1 || { say "motley does not start: $("$motley" --help 2>&1 | head -3)"; exit 1; }

# ---- 2. gpu tests ----------------------------------------------------------------
for t in cuda_tests train_gpu_tests; do
  exe="$(find_bin $t)"
  if [ -z "$exe" ]; then say "[$t] missing"; continue; fi
  run "$t" 300 "$exe" --gtest_brief=1
  grep -E "PASSED|FAILED|SKIPPED" "$OUT/$t.log" | sed "s/^/  $t: /" | tee -a "$report"
done

# ---- 3. benchmarks ---------------------------------------------------------------
large=(--set model.d_model=1024 --set model.n_layers=12 --set model.n_heads=16
       --set model.max_seq_len=1024 --set train.seq_len=1024
       --set model.moe.expert_hidden=2560 --set model.ffn_hidden=2560
       --set train.batch_size=16)
bench() {  # name, then motley bench flags
  local name="$1"
  shift
  run "bench_$name" 240 "$motley" bench --config configs/bench.json --set train.device=cuda "$@"
  grep -E "sgemm|median step|MoE layer|uniform|modse|arithmetic" "$OUT/bench_$name.log" | sed "s/^/  $name: /" | tee -a "$report"
}
bench bench --steps 10
bench bench_bf16 --steps 10 --set train.precision=bf16
bench large_bf16 --steps 5 --moe-tokens 16384 --set train.precision=bf16 "${large[@]}"
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  run torch_bench 240 python3 bench/torch_bench.py --config configs/bench.json --device cuda \
    --dtype bf16 --compile --steps 20
  grep -E "tokens/s|MFU|step" "$OUT/torch_bench.log" | tail -4 | sed 's/^/  torch: /' | tee -a "$report"
  run torch_bench_large 300 python3 bench/torch_bench.py --config configs/bench.json --device cuda \
    --dtype bf16 --compile --steps 10 "${large[@]}" --moe-tokens 16384
  grep -E "tokens/s|MFU|step" "$OUT/torch_bench_large.log" | tail -4 | sed 's/^/  torch large: /' | tee -a "$report"
else
  say "[torch_bench] skipped: PyTorch with CUDA is not importable here"
fi
say "done; logs in $OUT/"
