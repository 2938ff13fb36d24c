#!/usr/bin/env bash
# Sets up, builds and runs motley's main job on this machine. Until the
# training command lands this is the kernel benchmark: GEMM and fused
# kernels through motley's CPU backend against the machine's own BLAS and
# memory bandwidth.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/build.sh release --target motley
./build/release/apps/motley bench-kernels "$@"
