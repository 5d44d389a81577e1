#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (munged + slurmctld + slurmd on localhost), for
# trying `clusterlm launch --slurm` and for tests/e2e/test_slurm.py.
#
#   bash scripts/slurm-localhost.sh start     # install (apt) if missing, write config, start daemons
#   eval "$(bash scripts/slurm-localhost.sh env)"   # SLURM_CONF for sbatch/squeue/scontrol in this shell
#   bash scripts/slurm-localhost.sh status
#   bash scripts/slurm-localhost.sh stop
#
# Everything lives in a state folder (CLUSTERLM_SLURM_DIR, default /tmp/clusterlm-slurm): slurm.conf,
# a munge key and socket of its own, spool/state folders, logs and pid files. /etc/slurm and a
# system munged are never touched; clients find the cluster through SLURM_CONF. `start` is
# idempotent (daemons already up are left alone) and waits until the node is idle.
# Needs root for the daemons (SlurmdUser=root) and for apt-get; Debian 12 ships Slurm 22.05.
# Ports: CLUSTERLM_SLURMCTLD_PORT (6817) and CLUSTERLM_SLURMD_PORT (6818).
# scripts/testcluster.sh sources this file (nothing runs when sourced) and overrides the node hooks
# (node_lines, start_slurmds, stop_slurmds) to run one slurmd per network namespace.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # slurmctld, slurmd, munged live in sbin

STATE="${CLUSTERLM_SLURM_DIR:-/tmp/clusterlm-slurm}"
CTLD_PORT="${CLUSTERLM_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${CLUSTERLM_SLURMD_PORT:-6818}"
CONF="$STATE/slurm.conf"
MUNGE_SOCKET="$STATE/munge/munge.socket"

# the hooks' settings below come from testcluster.sh when it sources this file, never from the environment
[ "${BASH_SOURCE[0]}" != "$0" ] || unset ME CTLD_HOST CTLD_ADDR SLURMD_SPOOL SLURMD_PIDFILE SLURMD_LOG EXTRA_CONF
ME="${ME:-slurm-localhost}"
CTLD_HOST="${CTLD_HOST:-$(hostname -s)}"
CTLD_ADDR="${CTLD_ADDR:-127.0.0.1}"
# slurmd's files; %n is the node name (slurm.conf expands it in SlurmdSpoolDir/PidFile/LogFile)
SLURMD_SPOOL="${SLURMD_SPOOL:-$STATE/spool}"
SLURMD_PIDFILE="${SLURMD_PIDFILE:-$STATE/slurmd.pid}"
SLURMD_LOG="${SLURMD_LOG:-$STATE/log/slurmd.log}"
EXTRA_CONF="${EXTRA_CONF:-}"

die() { echo "$ME: $*" >&2; exit 1; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "not root and Slurm is not installed (missing: ${missing[*]}); run as root or apt-get install -y slurm-wlm munge"
  command -v apt-get >/dev/null || die "no apt-get: install slurm-wlm and munge with your package manager"
  echo "$ME: installing ${missing[*]} (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  # the Debian packages' postinst scripts start their daemons through invoke-rc.d, with Debian's
  # default config, not ours (slurmd fails without a slurm.conf): a policy-rc.d that says 101 stops that
  local policy=/usr/sbin/policy-rc.d ours=0 pkgs="slurmctld slurmd slurm-client munge"
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; ours=1; fi
  local rc=0
  # shellcheck disable=SC2086
  apt-get install -y --no-install-recommends $pkgs >"$STATE/apt.log" 2>&1 ||
    { apt-get update >>"$STATE/apt.log" 2>&1 && apt-get install -y --no-install-recommends $pkgs >>"$STATE/apt.log" 2>&1; } ||
    rc=$?
  [ $ours -eq 0 ] || rm -f $policy
  [ $rc -eq 0 ] || die "apt-get install $pkgs failed (exit $rc), see $STATE/apt.log"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  mkdir -p "$STATE/munge" "$STATE/ctld" "$STATE/spool" "$STATE/log"
  chmod 0700 "$STATE/munge"
  if [ ! -s "$STATE/munge/munge.key" ]; then
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$STATE/munge/munge.key" --force >/dev/null
    else
      dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0600 "$STATE/munge/munge.key"
  fi
  local cpus mem
  # CPUs and RealMemory as slurmd detects them (slurmd -C), so the node registers without a mismatch
  cpus="$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n1)"
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)"
  [ -n "$cpus" ] || cpus="$(nproc)"
  [ -n "$mem" ] || mem=1000
  local tmp="$CONF.tmp.$$"
  cat > "$tmp" <<EOF
# written by scripts/$ME.sh (state in $STATE)
ClusterName=clusterlm
SlurmctldHost=$CTLD_HOST($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits cred_expire+1 s before it may start again (Slurm's default 120)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$SLURMD_PIDFILE
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$SLURMD_LOG
# containers have no usable cgroup tree: track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# schedule every second: a requeued job becomes eligible by time, not by an event
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
# keep finished jobs in slurmctld's memory for 10 min: without accounting, scontrol/squeue are the record
MinJobAge=600
KillWait=10
InactiveLimit=0
$EXTRA_CONF
$(node_lines "$cpus" "$mem")
EOF
  mv "$tmp" "$CONF"
}

node_lines() {  # node_lines CPUS MEM: the NodeName and PartitionName lines (hook)
  local host; host="$(hostname -s)"
  echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$1 RealMemory=$2 State=UNKNOWN"
  echo "PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit="$1" what="$2"; shift 2
  local t=0
  until "$@" >/dev/null 2>&1; do
    sleep 0.5; t=$((t + 1))
    [ $t -lt $((limit * 2)) ] || return 1
  done
  echo "$ME: $what" >&2
}

node_idle() { SLURM_CONF="$CONF" sinfo --noheader --format=%t | grep -Eq '^(idle|mix|alloc)'; }

start_shared() {  # munged and slurmctld, which every node shares
  mkdir -p "$STATE"
  install_packages
  [ "$(id -u)" -eq 0 ] || die "the daemons run as root (SlurmdUser=root): run this as root"
  write_config
  if ! pid_alive "$STATE/munged.pid"; then
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
      --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
    wait_for 10 "munged up" munge --socket="$MUNGE_SOCKET" -n ||
      die "munged did not start, see $STATE/log/munged.log"
  fi
  if ! pid_alive "$STATE/slurmctld.pid"; then
    # -i: ignore state it cannot recover (a previous run's, e.g. after the machine rebooted)
    slurmctld -f "$CONF" -i || die "slurmctld did not start, see $STATE/log/slurmctld.log"
  fi
  wait_for 20 "slurmctld up" env SLURM_CONF="$CONF" scontrol ping ||
    die "slurmctld does not answer, see $STATE/log/slurmctld.log"
}

start_slurmds() {  # hook: the one slurmd of this host
  if ! pid_alive "$STATE/slurmd.pid"; then
    slurmd -f "$CONF" || die "slurmd did not start, see $STATE/log/slurmd.log"
  fi
  if ! wait_for 30 "node $(hostname -s) idle" node_idle; then
    SLURM_CONF="$CONF" scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    wait_for 10 "node resumed" node_idle || die "the node did not come up ($(SLURM_CONF="$CONF" sinfo --noheader -o '%t %E')), see $STATE/log/slurmd.log"
  fi
}

start() {
  start_shared
  start_slurmds
  echo "export SLURM_CONF=$CONF"
}

stop_one() {  # stop_one NAME PIDFILE
  local pidfile="$2" pid
  pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
  echo "$ME: $1 stopped" >&2
}

stop_slurmds() { stop_one slurmd "$STATE/slurmd.pid"; }  # hook

stop() {
  if [ -f "$CONF" ] && pid_alive "$STATE/slurmctld.pid"; then
    SLURM_CONF="$CONF" scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  stop_slurmds
  stop_one slurmctld "$STATE/slurmctld.pid"
  stop_one munged "$STATE/munged.pid"
}

status() {
  local rc=0
  for d in munged slurmctld slurmd; do
    if pid_alive "$STATE/$d.pid"; then echo "$d: running (pid $(cat "$STATE/$d.pid"))"; else echo "$d: stopped"; rc=1; fi
  done
  [ $rc -eq 0 ] && SLURM_CONF="$CONF" sinfo
  return $rc
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0  # sourced (scripts/testcluster.sh): functions only
case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env   (state folder: \$CLUSTERLM_SLURM_DIR, default /tmp/clusterlm-slurm)" >&2; exit 2 ;;
esac
