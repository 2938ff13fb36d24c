#!/usr/bin/env bash
# Sets up, builds and runs motley's tests on this machine:
#   1. installs the Debian packages motley needs (scripts/setup.sh),
#   2. builds the release preset (CUDA sources compiled when nvcc is found)
#      and runs every test not labelled gpu (GPU tests run where a GPU is),
#   3. builds the asan preset and runs the unit tests under
#      AddressSanitizer + UndefinedBehaviorSanitizer.
# MOTLEY_TEST_ASAN=0 skips step 3.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/build.sh release
ctest --preset release -j "$(nproc)" --timeout 600

if [ "${MOTLEY_TEST_ASAN:-1}" != "0" ]; then
  bash scripts/build.sh asan
  ctest --preset asan -j "$(nproc)" --timeout 600
fi
echo "motley tests: all passed"
