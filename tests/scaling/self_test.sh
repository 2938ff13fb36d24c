#!/bin/sh
# Runs bench/scaling.py --self-test with the first Python that has numpy
# ($PYTHON, python3 on PATH, then the system's /usr/bin/python3); exit 77
# (skipped) when none has.
#
#   self_test.sh SOURCE_DIR
cd "$1" || exit 1
for py in "${PYTHON:-}" python3 /usr/bin/python3; do
  [ -n "$py" ] || continue
  if "$py" -c 'import numpy' 2>/dev/null; then
    exec "$py" bench/scaling.py --self-test
  fi
done
echo "SKIP: no python3 with numpy"
exit 77
