#!/usr/bin/env bash
# Submits a long motley run as several Slurm jobs that continue one run
# directory (docs/cluster.md, "Long runs"):
#
#   cluster/submit.sh chain N [sbatch options...] -- CONFIG [motley train arguments...]
#   cluster/submit.sh array N [sbatch options...] -- CONFIG [motley train arguments...]
#
#   chain  N jobs, each with --dependency=afterany on the one before: job k
#          starts when job k-1 ended for any reason (done, time limit,
#          failure) and resumes from the run's checkpoints/LATEST.
#   array  one job array of N tasks run one at a time (--array=1-N%1); all
#          tasks continue runs/<job name>-<array job id> (train.sbatch's
#          default for arrays).
#
# The run directory: --run from the motley arguments, else for a chain
# runs/<job name>-<date-time> (printed). Jobs after the run completed start,
# see "run already complete" and exit 0 at once. Each job also requeues itself
# after a preemption or its time limit (train.sbatch); MOTLEY_REQUEUE=0
# turns that off so the next link of the chain takes over instead.
# Prints the job ids, one per line, on stdout.
#
# e.g.  cluster/submit.sh chain 4 --time=04:00:00 -J big -- configs/tiny.json --set train.steps=100000
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
sbatch_script="${MOTLEY_SBATCH_SCRIPT:-$here/slurm/train.sbatch}"

usage() {
  sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -ge 2 ] || usage
mode="$1" n="$2"
shift 2
case "$mode" in chain | array) ;; *) usage ;; esac
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: N must be a positive integer, not '$n'" >&2; exit 2; }

opts=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
[ $# -ge 2 ] && [ "$1" = -- ] || usage
shift
config="$1"
shift
args=("$@")

name=motley
for ((i = 0; i < ${#opts[@]}; i++)); do
  case "${opts[$i]}" in
    -J | --job-name) name="${opts[$((i + 1))]:-motley}" ;;
    --job-name=*) name="${opts[$i]#--job-name=}" ;;
    -J?*) name="${opts[$i]#-J}" ;;
  esac
done
have_run=0
for a in "${args[@]}"; do
  case "$a" in --run | --run=*) have_run=1 ;; esac
done
# Make the submit folder's MOTLEY_HOME known to the jobs.
export MOTLEY_HOME="${MOTLEY_HOME:-$(cd "$here/.." && pwd)}"

case "$mode" in
  chain)
    if [ $have_run = 0 ]; then
      run="runs/${name}-$(date +%Y%m%d-%H%M%S)"
      args+=(--run "$run")
      echo "submit.sh: run directory $run" >&2
    fi
    prev=""
    for ((k = 1; k <= n; k++)); do
      dep=()
      [ -n "$prev" ] && dep=("--dependency=afterany:$prev")
      prev="$(sbatch --parsable "${dep[@]}" "${opts[@]}" "$sbatch_script" "$config" "${args[@]}")"
      prev="${prev%%;*}"
      echo "$prev"
    done
    ;;
  array)
    out=(--output=%x-%A_%a.out)  # one output file per array task
    for o in "${opts[@]}"; do
      case "$o" in -o | -o* | --output | --output=*) out=() ;; esac
    done
    jid="$(sbatch --parsable "--array=1-${n}%1" "${out[@]}" "${opts[@]}" "$sbatch_script" "$config" "${args[@]}")"
    jid="${jid%%;*}"
    [ $have_run = 1 ] || echo "submit.sh: run directory runs/${name}-${jid}" >&2
    echo "$jid"
    ;;
esac
