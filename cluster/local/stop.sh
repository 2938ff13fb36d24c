#!/usr/bin/env bash
# Stops a local Slurm started by cluster/local/start.sh and every process it
# started: jobs are cancelled, then slurmd, slurmctld and munged are
# stopped by their pid files, then any leftover process carrying
# MOTLEY_LOCAL_SLURM_DAEMON=DIR in its environment (slurmstepd, job tasks) is
# killed. Never matches processes by name.
#
#   cluster/local/stop.sh [DIR] [--clean]
#
# DIR defaults to $MOTLEY_LOCAL_SLURM_DIR, else the folder of $SLURM_CONF.
# --clean also removes DIR. Safe to run twice.
set -uo pipefail

dir="" clean=0
for a in "$@"; do
  case "$a" in
    --clean) clean=1 ;;
    *) dir="$a" ;;
  esac
done
if [ -z "$dir" ]; then
  if [ -n "${MOTLEY_LOCAL_SLURM_DIR:-}" ]; then dir="$MOTLEY_LOCAL_SLURM_DIR"
  elif [ -n "${SLURM_CONF:-}" ]; then dir="$(dirname "$SLURM_CONF")"
  else echo "local-slurm: usage: stop.sh DIR [--clean] (or set SLURM_CONF)" >&2; exit 2
  fi
fi
[ -d "$dir" ] || { echo "local-slurm: nothing to stop: no folder $dir" >&2; exit 0; }
dir="$(cd "$dir" && pwd)"
[ -f "$dir/slurm.conf" ] || [ -d "$dir/munge" ] ||
  { echo "local-slurm: $dir is not a local Slurm folder" >&2; exit 2; }
export SLURM_CONF="$dir/slurm.conf"

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -s "$1" ] && cat "$1" 2>/dev/null || true; }

# Stops one daemon: SIGTERM, up to 10 s, then SIGKILL.
stop_pid() {
  local pid="$1"
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do alive "$pid" || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

# Processes whose environment names this cluster's folder.
marked() {
  grep -lzxF "MOTLEY_LOCAL_SLURM_DAEMON=$dir" /proc/[0-9]*/environ 2>/dev/null |
    sed -e 's#^/proc/##' -e 's#/environ$##' | grep -vx "$$" || true
}

ctld="$(pid_of "$dir/slurmctld.pid")"
if alive "$ctld"; then
  # Cancel every job so that slurmd tears the steps down itself.
  if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    # shellcheck disable=SC2046  # one argument per job id
    scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# SIGTERM to all three at once (each takes a second or two), then wait.
daemons="$(pid_of "$dir/slurmd.pid") $ctld $(pid_of "$dir/munge/munged.pid")"
for pid in $daemons; do alive "$pid" && kill -TERM "$pid" 2>/dev/null; done
for pid in $daemons; do stop_pid "$pid"; done

# Leftovers (slurmstepd of a step that would not end, its tasks).
left="$(marked)"
if [ -n "$left" ]; then
  kill -TERM $left 2>/dev/null || true
  sleep 1
  left="$(marked)"
  [ -n "$left" ] && kill -KILL $left 2>/dev/null || true
fi
rm -f "$dir/slurmctld.pid" "$dir/slurmd.pid" "$dir/munge/munged.pid" "$dir/munge/munge.socket"
echo "local-slurm: stopped ($dir)" >&2
if [ "$clean" = 1 ]; then rm -rf "$dir"; fi
exit 0
