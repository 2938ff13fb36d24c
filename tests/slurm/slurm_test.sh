#!/usr/bin/env bash
# End-to-end tests of cluster/slurm/train.sbatch on a one-node Slurm that
# this script starts (cluster/local/start.sh) and always stops, even on
# failure (label slurm, docs/cluster.md "What is tested").
#
#   tests/slurm/slurm_test.sh CASE MOTLEY_BINARY
#
# CASE:
#   submit    sbatch --wait of configs/tiny.json on 4 tasks (dp=2, ep=2,
#             pp=2) completes (exit 0) with its final checkpoint.
#   preempt   a reference job runs 30 steps; a second job gets
#             `scancel --signal=USR1 --batch` mid-run, saves a checkpoint,
#             exits 75, requeues itself, resumes from that checkpoint and must
#             end with the reference's final loss.
#   rank_failure  one rank of a running job is SIGKILLed (as the OOM killer
#             would): the job must fail promptly (no hang) and its output must
#             name the failed task.
#   long_runs cluster/submit.sh: a chain of 2 jobs (afterany) and a job
#             array of 2 run one at a time (%1) each continue one run.
#   no_pmix   srun without PMIx (MOTLEY_SRUN_MPI=none): every task exits 2
#             with the launch-check message, before any MPI_Init.
# Data: a small token file made here with `motley prepare` from generated
# text (no network). Exit 77 (skipped) when Slurm is not installed.
# MOTLEY_KEEP_TEST=1 keeps the work folder.
set -euo pipefail

case_name="${1:?usage: slurm_test.sh CASE MOTLEY_BINARY}"
motley="$(cd "$(dirname "${2:?usage: slurm_test.sh CASE MOTLEY_BINARY}")" && pwd)/$(basename "$2")"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

for tool in slurmctld slurmd munged sbatch; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "SKIP: $tool not installed (bash scripts/setup.sh installs Slurm and munge)"
    exit 77
  fi
done

t0=$SECONDS
watchdog=""
log() { echo "[slurm_test $case_name +$((SECONDS - t0))s] $*"; }
work="$(mktemp -d "${TMPDIR:-/tmp}/motley-slurm-test.XXXXXX")"
cleanup() {
  local rc=$?
  kill "$watchdog" 2>/dev/null || true
  [ -z "${waiter:-}" ] || kill "$waiter" 2>/dev/null || true
  bash "$root/cluster/local/stop.sh" "$work/slurm" || true
  if [ $rc -ne 0 ]; then
    for f in "$work"/*.out; do
      [ -f "$f" ] || continue
      echo "---- $f"
      grep -vE '^eval: ' "$f" | tail -n 40 || true
    done
    echo "---- slurmctld/slurmd log tails"
    tail -n 20 "$work/slurm/log/slurmctld.log" "$work/slurm/log/slurmd.log" 2>/dev/null || true
  fi
  if [ "${MOTLEY_KEEP_TEST:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
  log "exit $rc"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A watchdog below CTest's TIMEOUT (240 s): CTest kills with SIGKILL, which
# would skip the cleanup and leave the daemons running.
# It stops the cluster first (ending the jobs), then TERMs this script.
# Its sleep must not hold CTest's output pipe open after the test ends.
( trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  sleep "${MOTLEY_SLURM_TEST_DEADLINE:-210}" >/dev/null 2>&1 &
  nap=$!
  wait "$nap"
  echo "slurm_test: deadline reached: stopping" >&2
  bash "$root/cluster/local/stop.sh" "$work/slurm" >/dev/null 2>&1
  kill -TERM $$ ) &
watchdog=$!
fail() { log "FAIL: $*"; exit 1; }

eval "$(bash "$root/cluster/local/start.sh" "$work/slurm")"
log "local Slurm up"
cd "$work"

# ---- data: generated text -> motley prepare ---------------------------------
mkdir -p text
python3 - <<'EOF'
import random
r = random.Random(1)
words = ("the of and to a in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there would their we him been has when who will "
         "more no if out so said what up its about into than them can only other new some could "
         "time these two may then do first any my now such like our over man me even most made "
         "after also did many before must through back years where much your way well").split()
for i in range(20):
    with open(f"text/doc{i:02d}.txt", "w") as f:
        for _ in range(120):
            f.write(" ".join(r.choice(words) for _ in range(r.randint(5, 15))).capitalize() + ". ")
EOF
"$motley" prepare --input text --out data --vocab-size 512 --valid-fraction 0.05 >/dev/null
log "data prepared"

export MOTLEY="$motley" MOTLEY_HOME="$root"
sbatch_script="$root/cluster/slurm/train.sbatch"
common=("$root/configs/tiny.json" --set "data.train=$work/data/train.h5"
        --set "data.valid=$work/data/valid.h5" --set model.vocab_size=512
        --set parallel.dp=2 --set parallel.ep=2 --set parallel.pp=2 --set train.eval_every=0)

# `sbatch --wait ARGS`, in the background so that the watchdog's TERM is
# handled at once (a foreground command defers traps, and sbatch --wait
# polls a stopped controller forever); cleanup kills it.
waiter=""
sbatch_wait() {
  sbatch --wait "$@" &
  waiter=$!
  local rc=0
  wait "$waiter" || rc=$?
  waiter=""
  return $rc
}

# The state of job $1 ("" once it left the queue).
job_state() { scontrol -o show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true; }
# The last training row's loss and step in a metrics.jsonl.
final_loss() {
  python3 -c 'import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows=[r for r in rows if "loss" in r]
print(rows[-1]["step"], repr(rows[-1]["loss"]))' "$1"
}

case "$case_name" in
  submit)
    rc=0
    sbatch_wait --quiet -J submit --ntasks-per-node=4 "$sbatch_script" "${common[@]}" || rc=$?
    out="$(ls submit-*.out)"
    jid="${out#submit-}"; jid="${jid%.out}"
    log "sbatch --wait: exit $rc (job $jid)"
    [ $rc -eq 0 ] || fail "sbatch --wait exited $rc"
    grep -q '^launch: srun, 4 ranks' "$out" || fail "no 'launch: srun, 4 ranks' line in $out"
    grep -q '^done: 20 steps' "$out" || fail "no 'done: 20 steps' in $out"
    run="runs/submit-$jid"
    [ "$(cat "$run/checkpoints/LATEST")" = step_00000020.h5 ] || fail "LATEST is not step_00000020.h5"
    [ -s "$run/checkpoints/step_00000020.h5" ] || fail "no final checkpoint"
    read -r step loss < <(final_loss "$run/metrics.jsonl")
    [ "$step" = 20 ] || fail "metrics end at step $step"
    log "PASS: final checkpoint $run/checkpoints/step_00000020.h5, loss $loss"
    ;;

  preempt)
    steps=(--set train.steps=30 --set train.log_every=1 --set train.ckpt_every=0)
    sbatch_wait --quiet -J ref "$sbatch_script" "${common[@]}" "${steps[@]}" --run runs/ref ||
      fail "the reference job failed"
    read -r ref_step ref_loss < <(final_loss runs/ref/metrics.jsonl)
    log "reference: step $ref_step loss $ref_loss"

    jid="$(sbatch --parsable -J pre "$sbatch_script" "${common[@]}" "${steps[@]}" --run runs/pre)"
    # Signal once a few steps are logged (well before step 30).
    for _ in $(seq 1 300); do
      if [ -f runs/pre/metrics.jsonl ] && [ "$(wc -l <runs/pre/metrics.jsonl)" -ge 5 ]; then break; fi
      [ -n "$(job_state "$jid")" ] || fail "job $jid ended before it could be signalled"
      sleep 0.2
    done
    scancel --signal=USR1 --batch "$jid"
    log "sent USR1 to the batch shell of job $jid after $(wc -l <runs/pre/metrics.jsonl) steps"
    # Slurm holds a requeued job ~2 minutes (BeginTime) so that the old
    # run's step is torn down before the new one starts with the same step
    # id (its PMIx socket is named after it). Release it once the old step's
    # PMIx files are gone.
    released=0
    for _ in $(seq 1 600); do
      state="$(job_state "$jid")"
      if [ "$state" = PENDING ] && [ $released = 0 ] &&
         scontrol -o show job "$jid" | grep -q 'Restarts=1' &&
         ! compgen -G "$work/slurm/spool/stepd.slurm.pmix.$jid.*" >/dev/null &&
         ! compgen -G "$work/slurm/tmp/spmix_appdir_*_$jid.*" >/dev/null; then
        sleep 1
        scontrol update JobId="$jid" StartTime=now
        released=1
        log "job $jid requeued (PENDING, Restarts=1), old step gone: released"
      fi
      case "$state" in
        COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | "") break ;;
      esac
      sleep 0.2
    done
    [ "$state" = COMPLETED ] || fail "job $jid ended in state '${state}'"
    out="pre-$jid.out"
    grep -q 'received SIGUSR1' "$out" || fail "the batch shell did not report SIGUSR1"
    grep -q 'exiting with 75' "$out" || fail "motley did not stop with 75"
    grep -q "requeueing job $jid" "$out" || fail "train.sbatch did not requeue the job"
    [ $released = 1 ] || fail "the job was never PENDING with Restarts=1"
    grep -q 'restart 1:' "$out" || fail "no second run (SLURM_RESTART_COUNT=1)"
    stopped="$(grep -o 'saved a checkpoint at step [0-9]*' "$out" | grep -o '[0-9]*$')"
    resumed="$(grep -o 'resumed from .* at step [0-9]*' "$out" | grep -o '[0-9]*$')"
    [ -n "$stopped" ] && [ "$stopped" = "$resumed" ] ||
      fail "stopped at step '$stopped' but resumed at step '$resumed'"
    [ "$stopped" -lt 30 ] || fail "the signal came after the last step"
    read -r pre_step pre_loss < <(final_loss runs/pre/metrics.jsonl)
    log "preempted at step $stopped, resumed at $resumed; final: step $pre_step loss $pre_loss"
    [ "$pre_step" = 30 ] || fail "the resumed run ended at step $pre_step"
    python3 -c 'import sys
a, b = float(sys.argv[1]), float(sys.argv[2])
sys.exit(0 if abs(a - b) <= 1e-6 * abs(a) else 1)' "$ref_loss" "$pre_loss" ||
      fail "final loss $pre_loss differs from the uninterrupted run's $ref_loss"
    [ "$(grep -c '"loss"' runs/pre/metrics.jsonl)" = 30 ] || fail "metrics.jsonl does not hold 30 step rows"
    log "PASS: same final loss as the uninterrupted run ($ref_loss vs $pre_loss)"
    ;;

  rank_failure)
    steps=(--set train.steps=400 --set train.log_every=1)
    jid="$(sbatch --parsable -J fail "$sbatch_script" "${common[@]}" "${steps[@]}" --run runs/fail)"
    for _ in $(seq 1 300); do
      if [ -f runs/fail/metrics.jsonl ] && [ "$(wc -l <runs/fail/metrics.jsonl)" -ge 3 ]; then break; fi
      [ -n "$(job_state "$jid")" ] || fail "job $jid ended early"
      sleep 0.2
    done
    # Rank 3's process: the motley task whose environment says SLURM_PROCID=3.
    victim=""
    for f in $(grep -lzx 'SLURM_PROCID=3' /proc/[0-9]*/environ 2>/dev/null || true); do
      p="${f%/environ}"
      if grep -qzxF "SLURM_JOB_ID=$jid" "$f" 2>/dev/null &&
         [ "$(readlink "$p/exe" 2>/dev/null)" = "$motley" ]; then
        victim="${p#/proc/}"
        break
      fi
    done
    [ -n "$victim" ] || fail "rank 3's process not found"
    kill -KILL "$victim"
    killed_at=$SECONDS
    log "killed rank 3 (pid $victim) of job $jid"
    for _ in $(seq 1 300); do
      state="$(job_state "$jid")"
      case "$state" in
        RUNNING | COMPLETING | PENDING) sleep 0.2 ;;
        *) break ;;
      esac
    done
    took=$((SECONDS - killed_at))
    log "job $jid ended in state '$state' ${took}s after the kill"
    [ "$state" = FAILED ] || fail "job state '$state', expected FAILED"
    [ $took -le 30 ] || fail "the job took ${took}s to fail"
    out="fail-$jid.out"
    grep -q 'task 3' "$out" || fail "the job output does not name task 3"
    grep -q 'motley failed (exit' "$out" || fail "train.sbatch did not report the failure"
    steps_done="$(grep -c '"loss"' runs/fail/metrics.jsonl)"
    [ "$steps_done" -lt 400 ] || fail "the run finished despite the failure"
    log "PASS: failed promptly after $steps_done steps; output: $(grep -m1 'task 3' "$out")"
    ;;

  long_runs)
    # cluster/submit.sh: a chain of 2 jobs (afterany) and an array of 2 run
    # one at a time (%1). The first job of each finishes the 20 steps; the
    # second resumes from its final checkpoint and finds the run complete.
    wait_gone() {
      for _ in $(seq 1 600); do
        [ -z "$(squeue -h -t PD,R,CG,CF -j "$1" 2>/dev/null)" ] && return 0
        sleep 0.3
      done
      fail "jobs $1 still queued"
    }
    mapfile -t chain < <(bash "$root/cluster/submit.sh" chain 2 -J chain -- "${common[@]}" --run runs/chain)
    [ ${#chain[@]} = 2 ] || fail "submit.sh chain printed ${#chain[@]} job ids"
    scontrol -o show job "${chain[1]}" | grep -q "Dependency=afterany:${chain[0]}" ||
      fail "job ${chain[1]} does not depend on ${chain[0]}"
    wait_gone "${chain[0]},${chain[1]}"
    grep -q '^done: 20 steps' "chain-${chain[0]}.out" || fail "the first link did not finish"
    grep -q 'resumed from runs/chain/checkpoints/step_00000020.h5' "chain-${chain[1]}.out" ||
      fail "the second link did not resume from the first's final checkpoint"
    grep -q 'run already complete' "chain-${chain[1]}.out" || fail "no 'run already complete'"
    log "chain ${chain[*]}: second link resumed at step 20 and found the run complete"

    array="$(bash "$root/cluster/submit.sh" array 2 -J arr -- "${common[@]}")"
    wait_gone "$array"
    grep -q "^done: 20 steps, .* run directory runs/arr-$array" "arr-${array}_1.out" ||
      fail "array task 1 did not finish in runs/arr-$array"
    grep -q "resumed from runs/arr-$array/checkpoints/step_00000020.h5" "arr-${array}_2.out" ||
      fail "array task 2 did not continue runs/arr-$array"
    log "PASS: chain and array (%1) continue one run"
    ;;

  no_pmix)
    rc=0
    MOTLEY_SRUN_MPI=none sbatch_wait --quiet -J nopmix "$sbatch_script" "${common[@]}" || rc=$?
    out="$(ls nopmix-*.out)"
    [ $rc -eq 2 ] || fail "sbatch --wait exited $rc, expected 2"
    grep -q 'srun started 4 tasks with no MPI support' "$out" || fail "no launch-check message in $out"
    log "PASS: exit 2: $(grep -m1 'srun started' "$out" | cut -c1-120)..."
    ;;

  *) echo "unknown case $case_name" >&2; exit 2 ;;
esac
