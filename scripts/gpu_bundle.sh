#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs onto a GPU machine that has only
# CUDA, CMake and Python: the release build's binaries (CUDA compiled in)
# and the shared libraries they use that such a machine lacks (MPI, HDF5,
# OpenBLAS, Abseil, ...; CUDA's own libraries and the C library are left
# to the machine). The bundle lands in build/gpu-bundle/ (bin/, lib/),
# small enough to travel with the working tree.
#
#   bash scripts/build.sh release && bash scripts/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/release
out=build/gpu-bundle
bins=(
  "$build/apps/motley"
  "$build/tests/cuda/cuda_tests"
  "$build/tests/train/train_gpu_tests"
  "$build/tests/train/train_tests"
)
for b in "${bins[@]}"; do
  [ -x "$b" ] || { echo "gpu_bundle: $b is missing: build the release preset first" >&2; exit 1; }
done
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
cp "${bins[@]}" "$out/bin/"
# Every shared library the binaries load, except the C runtime, the
# dynamic loader and CUDA's (libcuda comes with the driver; cudart, cuBLAS
# and NCCL with the machine's toolkit).
for b in "${bins[@]}"; do ldd "$b"; done |
  awk '/=> \// { print $3 }' | sort -u |
  grep -Ev '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so|libcuda\.so|libcudart|libcublas|libnccl|/usr/local/cuda' |
  while read -r lib; do cp -L "$lib" "$out/lib/"; done
du -sh "$out" | awk '{ print "gpu_bundle: " $1 " in '"$out"'" }'
