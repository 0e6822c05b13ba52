#!/usr/bin/env bash
# A real N-node SLURM cluster on this one machine, for CI and for trying the job scripts.
#
#   tests/cluster/slurm_harness.sh up       install (if missing) + configure + start; wait until every node is idle
#   tests/cluster/slurm_harness.sh down     stop the daemons this harness started, remove its /etc/hosts line
#   tests/cluster/slurm_harness.sh status   print sinfo/squeue
#   tests/cluster/slurm_harness.sh running  exit 0 when slurmctld and every slurmd of this harness are running
#   tests/cluster/slurm_harness.sh nodes    print the node names, one per line
#
# N = MA_SLURM_NODES (default 3: two used by a 2-node job, one spare). The nodes are n1..nN: one
# slurmd per node, each started as `slurmd -N nK` and listening on its own port (6820+K), all with
# NodeAddr 127.0.0.1, their spool/pid/log files named with %n. The names resolve through one line
# this harness appends to /etc/hosts (127.0.0.1 only: no address is created, nothing outside the
# machine is reached) and removes again in `down`. N = 1 is the old single-node cluster (node n1).
#
# It installs Debian's slurm-wlm and munge with apt-get when they are absent (needs root), writes
# /etc/slurm/slurm.conf and starts munged, slurmctld and the slurmds as plain background daemons (no
# systemd in containers), every one with all inherited file descriptors closed (a daemon holding a
# caller's lock file would hold it for life). The settings are the ones that work inside
# unprivileged containers: proctrack/linuxproc (no cgroups), task/none, select/cons_tres with
# CR_Core, SlurmUser=root; each node declares CPUs = nproc (the nodes share the machine's cores).
# Settings that make node failures quick to act on, and which users may copy (docs/benchmarks.md):
# KillWait=5 (SIGTERM -> SIGKILL of a cancelled step), SlurmdTimeout=10 (a dead node is DOWN after
# 10 s), MessageTimeout=5, and no accounting database (AccountingStorageType=none).
#
# A slurm.conf this harness did not write is never overwritten: `up` then exits 3, so it cannot
# clobber a real cluster's configuration. One written by this harness with other settings (another
# N, an older version of this file) is replaced and the daemons are restarted with it.
#
# Exit status of `up`: 0 = cluster ready; 3 = slurm cannot be installed or started here (the message
# says why; the pytest wrapper turns this into a skip); anything else = a bug.
set -euo pipefail

MARKER="# written by megatron_align tests/cluster/slurm_harness.sh"
HOSTS_MARKER="# megatron_align slurm_harness nodes"
CONF_DIR=/etc/slurm
CONF="${CONF_DIR}/slurm.conf"
STATE_DIR="${MA_SLURM_STATE_DIR:-/var/lib/ma-slurm}"
LOG_DIR="${MA_SLURM_LOG_DIR:-/var/log/ma-slurm}"
PARTITION="${MA_SLURM_PARTITION:-debug}"
WAIT_S="${MA_SLURM_WAIT_S:-60}"
NUM_NODES="${MA_SLURM_NODES:-3}"
BASE_PORT=6820
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || { echo "slurm_harness: MA_SLURM_NODES=$NUM_NODES: expected a positive integer" >&2; exit 2; }
NODES=()
for ((k = 1; k <= NUM_NODES; k++)); do NODES+=("n$k"); done

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
slurmd_pidfile() { echo "$STATE_DIR/slurmd-$1.pid"; }

cannot() {
  echo "slurm_harness: cannot run SLURM here: $*" >&2
  exit 3
}

# Run a daemon with every inherited descriptor above stderr closed.
detached() {
  (
    for fd in "/proc/$BASHPID/fd"/*; do
      fd="${fd##*/}"
      [[ "$fd" -gt 2 ]] && eval "exec $fd>&-" 2>/dev/null
    done
    exec "$@"
  )
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return
  fi
  [[ "$(id -u)" == 0 ]] || cannot "slurm-wlm/munge are not installed and installing them needs root"
  command -v apt-get >/dev/null || cannot "slurm-wlm/munge are not installed and there is no apt-get"
  echo "slurm_harness: installing slurm-wlm and munge with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; } >"/tmp/ma-slurm-apt.log" 2>&1; then
    tail -n 20 /tmp/ma-slurm-apt.log >&2
    cannot "apt-get install slurm-wlm munge failed (log: /tmp/ma-slurm-apt.log)"
  fi
}

write_conf() {
  if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
    cannot "$CONF exists and was not written by this harness; refusing to overwrite a real cluster's config"
  fi
  local host cpus k
  host="$(hostname -s)"
  cpus="$(nproc)"
  mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"
  local tmp="${CONF}.tmp.$$"
  {
    cat <<EOF
$MARKER
ClusterName=ma-ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=5
SlurmdTimeout=10
MessageTimeout=5
MinJobAge=600
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd-%n.pid
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/d/%n
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
EOF
    for ((k = 1; k <= NUM_NODES; k++)); do
      echo "NodeName=n$k NodeAddr=127.0.0.1 Port=$((BASE_PORT + k)) CPUs=${cpus} State=UNKNOWN"
    done
    echo "PartitionName=${PARTITION} Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } >"$tmp"
  if [[ -f "$CONF" ]] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return
  fi
  # Another configuration of this harness (another N, an older version): the daemons started with it go,
  # the remembered node states too (slurmctld would otherwise keep the old nodes), then this one is used.
  if [[ -f "$CONF" ]]; then
    echo "slurm_harness: replacing the harness configuration in $CONF (restarting its daemons)" >&2
    stop_daemons
    rm -rf "${STATE_DIR:?}/ctld"
    mkdir -p "$STATE_DIR/ctld"
  fi
  mv "$tmp" "$CONF"
}

# One line in /etc/hosts names every node 127.0.0.1 (written in place: /etc/hosts may be a bind mount).
hosts_line() { echo "127.0.0.1 ${NODES[*]} $HOSTS_MARKER"; }
add_hosts() {
  local line
  line="$(hosts_line)"
  grep -qxF "$line" /etc/hosts && return
  remove_hosts
  echo "$line" >>/etc/hosts
}
remove_hosts() {
  grep -qF "$HOSTS_MARKER" /etc/hosts || return 0
  local kept
  kept="$(grep -vF "$HOSTS_MARKER" /etc/hosts)"
  printf '%s\n' "$kept" >/etc/hosts
}

start_munge() {
  if munge -n </dev/null >/dev/null 2>&1; then return; fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key || cannot "could not create /etc/munge/munge.key"
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if id munge >/dev/null 2>&1; then
    chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    detached runuser -u munge -- munged || cannot "munged failed to start (see /var/log/munge/munged.log)"
  else
    detached munged --force || cannot "munged failed to start (see /var/log/munge/munged.log)"
  fi
  touch "$STATE_DIR/munged.started"  # `down` stops only a munged this harness started
  for _ in $(seq 1 20); do
    munge -n </dev/null >/dev/null 2>&1 && return
    sleep 0.5
  done
  cannot "munged did not answer"
}

start_slurm() {
  local node
  pid_alive "$STATE_DIR/slurmctld.pid" || detached slurmctld || cannot "slurmctld failed (log: $LOG_DIR/slurmctld.log)"
  for node in "${NODES[@]}"; do
    mkdir -p "$STATE_DIR/d/$node"
    pid_alive "$(slurmd_pidfile "$node")" || detached slurmd -N "$node" ||
      cannot "slurmd -N $node failed (log: $LOG_DIR/slurmd-$node.log)"
  done
}

wait_idle() {
  local node state ready
  for _ in $(seq 1 "$WAIT_S"); do
    ready=0
    for node in "${NODES[@]}"; do
      state="$(sinfo -h -n "$node" -o '%T' 2>/dev/null | head -n 1 || true)"
      case "$state" in
        idle | mixed | allocated | completing) ready=$((ready + 1)) ;;
        down* | drain*)
          # A node remembered as down (an earlier run, a node-loss test): bring it back.
          scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
          ;;
      esac
    done
    if [[ "$ready" == "$NUM_NODES" ]]; then
      echo "slurm_harness: nodes ${NODES[*]} are up (partition $PARTITION, $(nproc) CPUs each)"
      return
    fi
    sleep 1
  done
  tail -n 20 "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-*.log >&2 || true
  cannot "nodes ${NODES[*]} did not all become idle within ${WAIT_S}s"
}

stop_pidfile() {
  local pidfile="$1" pid
  pid_alive "$pidfile" || return 0
  pid="$(cat "$pidfile")"
  kill "$pid"
  for _ in $(seq 1 20); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -9 "$pid" 2>/dev/null || true
}

# Every slurmd this harness ever started (any N, and the single-node harness's slurmd.pid), then slurmctld.
stop_daemons() {
  local pidfile
  for pidfile in "$STATE_DIR"/slurmd*.pid; do
    [[ -e "$pidfile" ]] && stop_pidfile "$pidfile"
  done
  stop_pidfile "$STATE_DIR/slurmctld.pid"
}

case "${1:-up}" in
  up)
    # Two test sessions may bring the cluster up at once: one at a time, the second finds it running.
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/harness.lock"
    flock 9
    install_if_missing
    write_conf
    add_hosts
    start_munge
    start_slurm
    wait_idle
    ;;
  down)
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/harness.lock"
    flock 9
    stop_daemons
    if [[ -f "$STATE_DIR/munged.started" ]]; then
      stop_pidfile /run/munge/munged.pid
      rm -f "$STATE_DIR/munged.started"
    fi
    remove_hosts
    ;;
  running)
    pid_alive "$STATE_DIR/slurmctld.pid" || exit 1
    for node in "${NODES[@]}"; do pid_alive "$(slurmd_pidfile "$node")" || exit 1; done
    ;;
  nodes)
    printf '%s\n' "${NODES[@]}"
    ;;
  status)
    sinfo
    squeue
    ;;
  *)
    echo "usage: $0 {up|down|status|running|nodes}" >&2
    exit 2
    ;;
esac
