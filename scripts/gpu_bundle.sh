#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs onto a GPU machine that has only
# CUDA, CMake and Python: the release build's binaries (CUDA compiled in)
# and the shared libraries they use that such a machine lacks (MPI, HDF5,
# OpenBLAS, Abseil, ...; CUDA's own libraries and the C library are left
# to the machine). The bundle lands in build/gpu-bundle/ (bin/, lib/) and
# is packed as build/gpu-bundle.tar.xz (OpenBLAS alone is 35 MB unpacked),
# which is what travels with the working tree; scripts/gpu_check.sh
# unpacks it.
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
strip --strip-unneeded "$out"/bin/* 2>/dev/null || true
tar -C build -cJf build/gpu-bundle.tar.xz gpu-bundle
echo "gpu_bundle: $(du -sh "$out" | cut -f1) in $out," \
  "packed $(du -sh build/gpu-bundle.tar.xz | cut -f1) in build/gpu-bundle.tar.xz"
