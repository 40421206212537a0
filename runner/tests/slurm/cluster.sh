#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, without systemd, for the runner's Slurm end-to-end test (and for
# trying `backend = "slurm"` by hand). Needs Debian's `slurmctld slurmd slurm-client munge` and root.
#
#   runner/tests/slurm/cluster.sh start [STATE_DIR]   # prints `export SLURM_CONF=...`; node idle on success
#   runner/tests/slurm/cluster.sh stop  [STATE_DIR]   # stops the daemons this script started
#
# Everything lives in STATE_DIR (default /tmp/bitllama-slurm): slurm.conf, spool, state, logs and pid files.
# Clients find the cluster through SLURM_CONF=STATE_DIR/slurm.conf. munged runs with Debian's default socket.
set -euo pipefail
cmd=${1:-}
state=${2:-${BITLLAMA_SLURM_DIR:-/tmp/bitllama-slurm}}
conf="$state/slurm.conf"

die() { echo "cluster.sh: $*" >&2; exit 1; }

stop() {
  for d in slurmd slurmctld munged; do
    local pidfile="$state/$d.pid"
    if [ -f "$pidfile" ]; then
      local pid; pid=$(cat "$pidfile")
      if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
      fi
      rm -f "$pidfile"
    fi
  done
}

start() {
  [ "$(id -u)" -eq 0 ] || die "run as root (the daemons run as root here)"
  for b in munged slurmctld slurmd sbatch squeue scontrol sinfo; do
    command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || die "$b not found: apt-get install slurmctld slurmd slurm-client munge"
  done
  export PATH="$PATH:/usr/sbin"
  stop
  mkdir -p "$state"/{spool,ctld,log}
  host=$(hostname -s)
  # munge: a key if the package left none, then the daemon as the munge user.
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if ! pgrep -x munged >/dev/null; then
    if id munge >/dev/null 2>&1; then
      runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    else
      munged --force --pid-file=/run/munge/munged.pid
    fi
    cp /run/munge/munged.pid "$state/munged.pid"
  fi
  for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munged does not answer (see /var/log/munge/munged.log)"

  # The node line as slurmd itself sees this machine (CPUs, memory).
  node=$(slurmd -C | head -n 1)
  cat >"$conf" <<CONF
ClusterName=bitllama-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$conf"
  slurmctld -f "$conf" -i
  slurmd -f "$conf"
  # Both daemons must be ours and alive (a port held by another cluster makes them exit at once).
  sleep 0.5
  for d in slurmctld slurmd; do
    for _ in $(seq 30); do [ -s "$state/$d.pid" ] && break; sleep 0.1; done
    if ! { [ -s "$state/$d.pid" ] && kill -0 "$(cat "$state/$d.pid")" 2>/dev/null; }; then
      tail -n 20 "$state/log/$d.log" >&2 || true
      die "$d did not stay up (log above, in $state/log; is another Slurm cluster using its port?)"
    fi
  done
  for _ in $(seq 100); do
    st=$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)
    [ "$st" = "idle" ] && break
    sleep 0.2
  done
  st=$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)
  if [ "$st" != "idle" ]; then
    tail -n 20 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
    die "the node is '$st', not idle, after 20 s (logs above, in $state/log)"
  fi
  echo "export SLURM_CONF=$conf"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) die "usage: cluster.sh start|stop [STATE_DIR]" ;;
esac
