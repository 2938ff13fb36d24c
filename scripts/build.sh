#!/usr/bin/env bash
# Configures and builds one CMake preset (default: release).
#   scripts/build.sh [release|debug|asan] [extra cmake --build args...]
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-release}"
shift || true
jobs="${MOTLEY_JOBS:-$(nproc)}"
# Let ccache (when installed) reuse objects across clones of the repository.
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cmake --preset "$preset" >"$log" 2>&1 || { cat "$log"; exit 1; }
# The configuration summary (what was found) is worth seeing every time.
sed -n '/motley .* configuration/,/tests /p' "$log" | sed 's/^-- //'
cmake --build --preset "$preset" -j "$jobs" "$@"
