#!/usr/bin/env bash
# A Slurm cluster of N "nodes" on this machine, each a Linux network namespace with its own address and
# host name, for multi-node runs and node failures on purpose (tests/e2e/test_multinode.py).
#
#   bash scripts/testcluster.sh start 2          # namespaces tcn1, tcn2 + bridge + munged/slurmctld/slurmd x2
#   eval "$(bash scripts/testcluster.sh env)"     # SLURM_CONF for sbatch/squeue/scontrol in this shell
#   bash scripts/testcluster.sh status
#   bash scripts/testcluster.sh exec tcn1 CMD...   # run CMD on node tcn1 (its network, its host name)
#   bash scripts/testcluster.sh cut tcn2           # pull tcn2's cable (link down: no RST, packets vanish)
#   bash scripts/testcluster.sh restore tcn2       # plug it back (its slurmd restarted if killed or if Slurm holds it DOWN)
#   bash scripts/testcluster.sh kill tcn2          # SIGKILL every process of tcn2 (slurmd, tasks, ...)
#   bash scripts/testcluster.sh run 2 CMD...       # start, run CMD, stop (also when CMD fails)
#   bash scripts/testcluster.sh stop               # idempotent: jobs, daemons, namespaces, links, files
#
# Layout: a bridge (tcnbr0, 10.77.0.1/24) in the root namespace; node i is namespace tcn<i> with a veth
# pair tcn<i>h (on the bridge) <-> eth0 (10.77.0.<10+i>), host name tcn<i> (a UTS namespace around
# its slurmd, so gloo, which binds to the address its host name resolves to, uses eth0), and the
# cluster's hosts file bind-mounted over /etc/hosts in a mount namespace of its own (not `ip netns
# exec`: it remounts /sys, and slurmd then finds no cgroup file system). munged and slurmctld run
# once, in the root namespace, on the bridge address (munge's socket is a file, reachable from every
# namespace); one `slurmd -N tcn<i>` runs per namespace with its own spool, pid and log files.
# Traffic stays inside the machine: nothing is routed or NATed off the bridge.
#
# Everything else comes from scripts/slurm-localhost.sh (sourced: install, config, munged,
# slurmctld), with state in CLUSTERLM_TESTCLUSTER_DIR (default /tmp/clusterlm-testcluster).
# Settings: CLUSTERLM_TC_PREFIX (tcn: node, namespace and bridge names), CLUSTERLM_TC_NET (10.77.0:
# the /24), CLUSTERLM_SLURMCTLD_PORT (6827), CLUSTERLM_SLURMD_PORT (6828), CLUSTERLM_TC_SLURMD_TIMEOUT
# (10 s: how long slurmctld waits before it marks a silent node DOWN). Needs root.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ME=testcluster
PREFIX="${CLUSTERLM_TC_PREFIX:-tcn}"
NET="${CLUSTERLM_TC_NET:-10.77.0}"
BR="${PREFIX}br0"
export CLUSTERLM_SLURM_DIR="${CLUSTERLM_TESTCLUSTER_DIR:-/tmp/clusterlm-testcluster}"
export CLUSTERLM_SLURMCTLD_PORT="${CLUSTERLM_SLURMCTLD_PORT:-6827}"
export CLUSTERLM_SLURMD_PORT="${CLUSTERLM_SLURMD_PORT:-6828}"
# slurmctld insists on running on the host SlurmctldHost names: this machine's name, at the bridge address
CTLD_HOST="$(hostname -s)"
CTLD_ADDR="$NET.1"
SLURMD_SPOOL="$CLUSTERLM_SLURM_DIR/spool/%n"
SLURMD_PIDFILE="$CLUSTERLM_SLURM_DIR/run/%n.slurmd.pid"
SLURMD_LOG="$CLUSTERLM_SLURM_DIR/log/slurmd-%n.log"
# a node that stops answering is DOWN after this many seconds (Slurm's default is 300)
EXTRA_CONF="SlurmdTimeout=${CLUSTERLM_TC_SLURMD_TIMEOUT:-10}"
# shellcheck source=slurm-localhost.sh
source "$HERE/slurm-localhost.sh"

NODES_FILE="$STATE/nodes"

nodes() {  # the nodes of the running cluster (from start), else any namespace with our prefix
  if [ -s "$NODES_FILE" ]; then cat "$NODES_FILE"; else ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" || true; fi
}
addr_of() { echo "$NET.$((10 + ${1#"$PREFIX"}))"; }
slurmd_pidfile() { echo "$STATE/run/$1.slurmd.pid"; }
known_node() { nodes | grep -qx "$1" || die "no node $1 (nodes: $(nodes | tr '\n' ' '))"; }

node_lines() {  # hook of slurm-localhost.sh's write_config: one NodeName per namespace
  local n
  for n in $(nodes); do
    echo "NodeName=$n NodeHostname=$n NodeAddr=$(addr_of "$n") CPUs=$1 RealMemory=$2 State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$(nodes | paste -sd, -) Default=YES MaxTime=INFINITE State=UP"
}

net_up() {  # net_up N: the bridge, N namespaces, their veth pairs, addresses and hosts files
  local count="$1" i n
  [ "$count" -ge 1 ] && [ "$count" -le 200 ] || die "N=$count must be in [1, 200]"
  mkdir -p "$STATE"
  if [ -s "$NODES_FILE" ] && [ "$(wc -l < "$NODES_FILE")" -ne "$count" ]; then
    die "a cluster of $(wc -l < "$NODES_FILE") nodes is running in $STATE: stop it first"
  fi
  seq 1 "$count" | sed "s/^/$PREFIX/" > "$NODES_FILE"
  ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge
  ip addr show dev "$BR" | grep -q "inet $CTLD_ADDR/" || ip addr add "$CTLD_ADDR/24" dev "$BR"
  ip link set "$BR" up
  { echo "127.0.0.1 localhost"; echo "$CTLD_ADDR $CTLD_HOST ${PREFIX}ctl"
    for n in $(nodes); do echo "$(addr_of "$n") $n"; done; } > "$STATE/hosts"
  for i in $(seq 1 "$count"); do
    n="$PREFIX$i"
    ip netns list | awk '{print $1}' | grep -qx "$n" || ip netns add "$n"
    if ! ip link show "${n}h" >/dev/null 2>&1; then
      ip link add "${n}h" type veth peer name "${n}n"
      ip link set "${n}n" netns "$n"
      ip -n "$n" link set "${n}n" name eth0
      ip -n "$n" addr add "$(addr_of "$n")/24" dev eth0
    fi
    ip -n "$n" link set lo up
    ip -n "$n" link set eth0 up
    ip link set "${n}h" master "$BR" up
  done
}

in_node() {  # in_node NODE CMD...: CMD in NODE's network namespace, with its host name and hosts file
  local n="$1"; shift
  nsenter --net="/run/netns/$n" unshare --uts --mount --propagation slave -- \
    sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"' "$n" "$STATE/hosts" "$@"
}

start_slurmd() {
  local n="$1"
  pid_alive "$(slurmd_pidfile "$n")" && return 0
  mkdir -p "$STATE/run" "$STATE/spool/$n"
  in_node "$n" slurmd -f "$CONF" -N "$n" || die "slurmd of $n did not start, see $STATE/log/slurmd-$n.log"
}

all_idle() {  # every node idle (or busy), none down
  local want; want="$(nodes | wc -l)"
  [ "$(SLURM_CONF="$CONF" sinfo -N --noheader --format='%N %t' | grep -Ec ' (idle|mix|alloc)$')" -eq "$want" ]
}

start_slurmds() {  # hook of slurm-localhost.sh's start
  local n
  for n in $(nodes); do start_slurmd "$n"; done
  if ! wait_for 30 "$(nodes | wc -l) nodes idle" all_idle; then
    for n in $(nodes); do SLURM_CONF="$CONF" scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true; done
    wait_for 15 "nodes resumed" all_idle ||
      die "nodes did not come up: $(SLURM_CONF="$CONF" sinfo -N --noheader -o '%N %t %E' | tr '\n' ';'), see $STATE/log"
  fi
}

kill_node() {  # SIGKILL every process in NODE's namespace, until none is left (children may fork)
  local n="$1" pids k
  for k in $(seq 1 20); do
    pids="$(ip netns pids "$n" 2>/dev/null || true)"
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  echo "$ME: processes of $n survive SIGKILL: $(ip netns pids "$n" | tr '\n' ' ')" >&2
}

stop_slurmds() {  # hook of slurm-localhost.sh's stop: each node's slurmd, then everything left in it
  local n
  for n in $(nodes); do
    stop_one "slurmd $n" "$(slurmd_pidfile "$n")"
    kill_node "$n"
  done
}

restore_node() {  # link up, and a slurmd that registers now
  local n="$1" st
  ip link set "${n}h" up
  # slurmctld returns a node it holds DOWN to service (ReturnToService=2) when its slurmd registers; a
  # slurmd that lived through the cut would be heard again only at slurmctld's next ping of non-responding
  # nodes (measured: 80 s): restarted, it registers at once
  st="$(SLURM_CONF="$CONF" sinfo --noheader --nodes="$n" --format=%t 2>/dev/null || true)"
  case "$st" in down*|*\*) stop_one "slurmd $n" "$(slurmd_pidfile "$n")" ;; esac
  start_slurmd "$n"
}

net_down() {
  local n
  for n in $(nodes); do
    ip netns del "$n" 2>/dev/null || true  # takes eth0 with it, and so the veth pair
    ip link del "${n}h" 2>/dev/null || true
  done
  ip link del "$BR" 2>/dev/null || true
  rm -f "$NODES_FILE"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "namespaces, links and the Slurm daemons need root: run this as root"
  [ $# -eq 1 ] && [[ "$1" =~ ^[0-9]+$ ]] || die "usage: $0 start N"
  # a start that fails half way leaves nothing behind
  trap 'echo "$ME: start failed, cleaning up" >&2; stop' EXIT
  net_up "$1"
  start_shared
  start_slurmds
  trap - EXIT
  echo "export SLURM_CONF=$CONF"
}

stop() {
  if [ -f "$CONF" ] && pid_alive "$STATE/slurmctld.pid"; then
    SLURM_CONF="$CONF" timeout 20 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  stop_slurmds
  stop_one slurmctld "$STATE/slurmctld.pid"
  stop_one munged "$STATE/munged.pid"
  net_down
}

status() {
  local rc=0 d n link
  for d in munged slurmctld; do
    if pid_alive "$STATE/$d.pid"; then echo "$d: running (pid $(cat "$STATE/$d.pid"))"; else echo "$d: stopped"; rc=1; fi
  done
  for n in $(nodes); do
    link="$(ip -br link show "${n}h" 2>/dev/null | awk '{print $2}')"
    if pid_alive "$(slurmd_pidfile "$n")"; then d="slurmd running"; else d="slurmd stopped"; rc=1; fi
    echo "$n: $(addr_of "$n"), link ${link:-missing}, $d, $(ip netns pids "$n" 2>/dev/null | wc -l) processes"
  done
  [ $rc -eq 0 ] && SLURM_CONF="$CONF" sinfo -N
  return $rc
}

cmd="${1:-}"; shift || true
case "$cmd" in
  start) start "$@" ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  addr) known_node "$1"; addr_of "$1" ;;
  exec) known_node "$1"; in_node "$@" ;;
  cut) known_node "$1"; ip link set "${1}h" down; echo "$ME: $1 cut" >&2 ;;
  restore) known_node "$1"; restore_node "$1"; echo "$ME: $1 restored" >&2 ;;
  kill) known_node "$1"; kill_node "$1"; rm -f "$(slurmd_pidfile "$1")"; echo "$ME: every process of $1 killed" >&2 ;;
  run)
    [ $# -ge 2 ] || die "usage: $0 run N CMD..."
    start "$1" >/dev/null; shift
    trap stop EXIT
    rc=0; "$@" || rc=$?
    exit $rc ;;
  *) echo "usage: $0 start N|stop|status|env|addr NODE|exec NODE CMD...|cut NODE|restore NODE|kill NODE|run N CMD...
  (state folder: \$CLUSTERLM_TESTCLUSTER_DIR, default /tmp/clusterlm-testcluster)" >&2; exit 2 ;;
esac
