#!/usr/bin/env bash
# Starts a one-node Slurm on this machine, for tests and for trying the
# cluster/ scripts without a cluster (docs/cluster.md, "A local Slurm").
#
#   eval "$(cluster/local/start.sh [DIR])"     # exports SLURM_CONF
#   sbatch ... ; squeue ; srun ...
#   cluster/local/stop.sh [DIR]                # DIR defaults to $SLURM_CONF's folder
#
# Everything lives under DIR (default: a new mktemp folder under $TMPDIR):
# a munge key and socket of its own, slurm.conf, the controller's state,
# the node's spool, pid files and logs (DIR/log/*.log). Nothing in /etc is
# read or written, so several local clusters (one per test) can run at
# once: each picks its own free ports.
#
# The node: one node "localnode" (127.0.0.1) declaring MOTLEY_SLURM_CPUS
# CPUs (default 8, more than most laptops and CI boxes have: with
# SlurmdParameters=config_overrides slurmd accepts the declared count, so
# 4 single-CPU tasks fit on 2 cores); proctrack/linuxproc, task/none,
# select/cons_tres with CR_CPU (no cgroups, no systemd needed);
# MpiDefault=pmix when Slurm has the pmix plugin, else none.
# Daemons run as the calling user (root in containers and CI) and are
# started directly, no systemd. The script waits until `sinfo` shows the
# node idle (MOTLEY_SLURM_TIMEOUT seconds, default 60) and fails with the
# daemons' log tails otherwise, after stopping what it started.
#
# stdout carries only the `export` lines; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cpus="${MOTLEY_SLURM_CPUS:-8}"
timeout="${MOTLEY_SLURM_TIMEOUT:-60}"

say() { echo "local-slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }

for tool in munged slurmctld slurmd sinfo scontrol; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool not found: install Debian's munge slurmctld slurmd slurm-client (bash scripts/setup.sh)"
done

if [ $# -ge 1 ]; then
  dir="$1"
  mkdir -p "$dir"
else
  dir="$(mktemp -d "${TMPDIR:-/tmp}/motley-slurm.XXXXXX")"
fi
dir="$(cd "$dir" && pwd)"
if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
  die "a local Slurm already runs in $dir (stop it with cluster/local/stop.sh $dir)"
fi
mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log" "$dir/tmp"
chmod 0700 "$dir/munge"

# From here on, a failure stops whatever was started.
fail() {
  say "error: $*"
  for f in "$dir"/log/*.log; do
    [ -s "$f" ] || continue
    say "---- last lines of $f"
    tail -n 15 "$f" >&2 || true
  done
  bash "$here/stop.sh" "$dir" >&2 || true
  exit 1
}

# A free TCP port on 127.0.0.1 (nothing answers a connection to it).
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      if [ "$p" != "${1:-}" ]; then echo "$p"; return 0; fi
    fi
  done
  return 1
}

# The daemons (and the slurmstepd processes slurmd forks) carry
# MOTLEY_LOCAL_SLURM_DAEMON=DIR in their environment: stop.sh finds
# leftovers by it. Only they: the user's shell gets MOTLEY_LOCAL_SLURM_DIR.
export SLURM_CONF="$dir/slurm.conf"
daemon_env=(env "MOTLEY_LOCAL_SLURM_DAEMON=$dir")

# ---- munge: its own key, socket, pid, log and seed files ---------------------------
socket="$dir/munge/munge.socket"
if [ ! -s "$dir/munge/munge.key" ]; then
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null 2>&1 ||
      dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  else
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
fi
chmod 0600 "$dir/munge/munge.key"
"${daemon_env[@]}" munged --force --socket="$socket" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
  --seed-file="$dir/munge/munged.seed" 2>>"$dir/log/munged.log" ||
  fail "munged did not start"
for _ in $(seq 1 50); do [ -S "$socket" ] && break; sleep 0.1; done
[ -S "$socket" ] || fail "munged's socket $socket did not appear"
if command -v munge >/dev/null 2>&1; then
  munge -n -S "$socket" | unmunge -S "$socket" >/dev/null 2>&1 ||
    fail "munge round trip through $socket failed"
fi

# ---- slurm.conf ---------------------------------------------------------------
plugin_dir=""
for d in /usr/lib/x86_64-linux-gnu/slurm-wlm /usr/lib/aarch64-linux-gnu/slurm-wlm \
         /usr/lib/slurm /usr/lib64/slurm /usr/local/lib/slurm; do
  if [ -e "$d/select_cons_tres.so" ]; then plugin_dir="$d"; break; fi
done
mpi_default=none
if [ -n "$plugin_dir" ] && [ -e "$plugin_dir/mpi_pmix.so" ]; then mpi_default=pmix; fi

ctld_port="$(free_port)" || fail "no free TCP port"
slurmd_port="$(free_port "$ctld_port")" || fail "no free TCP port"
host="$(hostname -s)"
user="$(id -un)"

cat >"$dir/slurm.conf" <<EOF
# Written by cluster/local/start.sh: a one-node Slurm for tests.
ClusterName=motleylocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
TmpFS=$dir/tmp
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=$mpi_default
SwitchType=switch/none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
# Quick turnaround for tests: a finished job leaves the queue after 10 s,
# a killed step's processes get 5 s between SIGTERM and SIGKILL.
MinJobAge=10
KillWait=5
InactiveLimit=0
Waittime=0
NodeName=localnode NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1024 State=UNKNOWN
PartitionName=local Nodes=localnode Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
# An empty plugin stack: do not read the system's /etc/slurm/plugstack.conf.
: >"$dir/plugstack.conf"
echo "PlugStackConfig=$dir/plugstack.conf" >>"$dir/slurm.conf"

# ---- daemons ----------------------------------------------------------------
"${daemon_env[@]}" slurmctld -i -f "$dir/slurm.conf" >>"$dir/log/slurmctld.log" 2>&1 || fail "slurmctld did not start"
"${daemon_env[@]}" slurmd -N localnode -f "$dir/slurm.conf" >>"$dir/log/slurmd.log" 2>&1 || fail "slurmd did not start"

deadline=$((SECONDS + timeout))
state=""
while [ $SECONDS -lt $deadline ]; do
  state="$(sinfo -h -n localnode -o '%t' 2>/dev/null || true)"
  case "$state" in
    idle*) break ;;
    down* | drain* | fail*)
      # ReturnToService=2 brings it back once slurmd registers; nudge it.
      scontrol update nodename=localnode state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle*) ;;
  *) fail "the node did not become idle within ${timeout}s (sinfo state: '${state:-no answer}')" ;;
esac

cat >"$dir/env.sh" <<EOF
export SLURM_CONF=$dir/slurm.conf
export MOTLEY_LOCAL_SLURM_DIR=$dir
EOF
say "up in $dir: node localnode, $cpus CPUs, MpiDefault=$mpi_default, slurmctld port $ctld_port"
cat "$dir/env.sh"
