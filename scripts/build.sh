#!/usr/bin/env bash
# Configures and builds one CMake preset (default: release).
#   scripts/build.sh [release|debug|asan] [extra cmake --build args...]
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-release}"
shift || true
jobs="${MOTLEY_JOBS:-$(nproc)}"
cmake --preset "$preset" >"build-$preset.configure.log" 2>&1 || {
  cat "build-$preset.configure.log"; exit 1; }
# The configuration summary (what was found) is worth seeing every time.
sed -n '/motley .* configuration/,/tests /p' "build-$preset.configure.log" | sed 's/^-- //'
rm -f "build-$preset.configure.log"
cmake --build --preset "$preset" -j "$jobs" "$@"
