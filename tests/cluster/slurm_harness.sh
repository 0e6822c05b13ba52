#!/usr/bin/env bash
# A real, single-node SLURM cluster on localhost, for CI and for trying the job scripts.
#
#   tests/cluster/slurm_harness.sh up      install (if missing) + configure + start; wait until the node is idle
#   tests/cluster/slurm_harness.sh down    stop the daemons this harness started
#   tests/cluster/slurm_harness.sh status  print sinfo/squeue
#   tests/cluster/slurm_harness.sh running exit 0 when slurmctld and slurmd of this harness are running
#
# It installs Debian's slurm-wlm and munge with apt-get when they are absent (needs root), writes
# /etc/slurm/slurm.conf for one node named after this host with CPUs = nproc, and starts munged,
# slurmctld and slurmd as plain background daemons (no systemd in containers). The settings are the
# ones that work inside unprivileged containers: proctrack/linuxproc (no cgroups), task/none,
# select/cons_tres with CR_Core, SlurmUser=root. A slurm.conf this harness did not write is never
# overwritten: `up` then fails, so it cannot clobber a real cluster's configuration.
#
# Exit status of `up`: 0 = cluster ready; 3 = slurm cannot be installed or started here (the message
# says why; the pytest wrapper turns this into a skip); anything else = a bug.
set -euo pipefail

MARKER="# written by megatron_align tests/cluster/slurm_harness.sh"
CONF_DIR=/etc/slurm
CONF="${CONF_DIR}/slurm.conf"
STATE_DIR="${MA_SLURM_STATE_DIR:-/var/lib/ma-slurm}"
LOG_DIR="${MA_SLURM_LOG_DIR:-/var/log/ma-slurm}"
PARTITION="${MA_SLURM_PARTITION:-debug}"
WAIT_S="${MA_SLURM_WAIT_S:-60}"

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

cannot() {
  echo "slurm_harness: cannot run SLURM here: $*" >&2
  exit 3
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
  local host cpus
  host="$(hostname -s)"
  cpus="$(nproc)"
  mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"
  local tmp="${CONF}.tmp.$$"
  cat >"$tmp" <<EOF
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
KillWait=10
MinJobAge=600
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd.pid
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/d
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if [[ -f "$CONF" ]] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return
  fi
  mv "$tmp" "$CONF"
  # Daemons already running with an older version of this file: make them re-read it.
  if pid_alive "$STATE_DIR/slurmctld.pid"; then scontrol reconfigure || true; fi
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
    runuser -u munge -- munged 9>&- || cannot "munged failed to start (see /var/log/munge/munged.log)"
  else
    munged --force 9>&- || cannot "munged failed to start (see /var/log/munge/munged.log)"
  fi
  for _ in $(seq 1 20); do
    munge -n </dev/null >/dev/null 2>&1 && return
    sleep 0.5
  done
  cannot "munged did not answer"
}

start_slurm() {
  pid_alive "$STATE_DIR/slurmctld.pid" || slurmctld 9>&- || cannot "slurmctld failed (log: $LOG_DIR/slurmctld.log)"
  pid_alive "$STATE_DIR/slurmd.pid" || slurmd 9>&- || cannot "slurmd failed (log: $LOG_DIR/slurmd.log)"
}

wait_idle() {
  local host state
  host="$(hostname -s)"
  for _ in $(seq 1 "$WAIT_S"); do
    state="$(sinfo -h -n "$host" -o '%T' 2>/dev/null | head -n 1 || true)"
    case "$state" in
      idle | mixed | allocated)
        echo "slurm_harness: node $host is $state (partition $PARTITION, $(nproc) CPUs)"
        return
        ;;
      down* | drain*)
        # A node remembered as down from an earlier run: bring it back.
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        ;;
    esac
    sleep 1
  done
  tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
  cannot "node $host did not become idle within ${WAIT_S}s (last state: '${state:-none}')"
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

case "${1:-up}" in
  up)
    # Two test sessions may bring the cluster up at once: one at a time, the second finds it running.
    # The daemons are started with fd 9 closed (`9>&-`): a daemon that inherited it would hold this
    # lock for its whole life, and every later `up` on the machine would wait on it forever.
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/harness.lock"
    flock 9
    install_if_missing
    write_conf
    start_munge
    start_slurm
    wait_idle
    ;;
  down)
    stop_pidfile "$STATE_DIR/slurmd.pid"
    stop_pidfile "$STATE_DIR/slurmctld.pid"
    ;;
  running)
    pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid"
    ;;
  status)
    sinfo
    squeue
    ;;
  *)
    echo "usage: $0 {up|down|status|running}" >&2
    exit 2
    ;;
esac
