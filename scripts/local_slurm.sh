#!/usr/bin/env bash
# A throw-away Slurm cluster on this host, for testing the sbatch scripts (Debian / Ubuntu, as root):
# munged + slurmctld + two slurmd nodes (n1, n2: one host, distinct ports), all state, logs and sockets under
# one folder. Nothing is installed as a service and nothing keeps running after `down`.
#
#   bash scripts/local_slurm.sh up      # installs slurm-wlm with apt-get if missing, starts the daemons
#   eval "$(bash scripts/local_slurm.sh env)"   # SLURM_CONF for sbatch / squeue / scontrol
#   sbatch --nodes=2 slurm/wan13b_rcm.sbatch ...
#   bash scripts/local_slurm.sh down    # stops the daemons, removes the folder
#
# Environment: LOCAL_SLURM_DIR (state folder; default ${TMPDIR:-/tmp}/local-slurm-$UID), LOCAL_SLURM_PORT
# (slurmctld's port; the nodes take the next two; default 6817), LOCAL_SLURM_NODES (1 or 2, default 2).
# `up` is idempotent: with the daemons of that folder alive it only waits for the nodes to be idle.
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/local-slurm-$(id -u)}
PORT=${LOCAL_SLURM_PORT:-6817}
NODES=${LOCAL_SLURM_NODES:-2}
CONF=$DIR/slurm.conf

die() { echo "local_slurm: $*" >&2; exit 1; }

node_names() { seq -f "n%g" 1 "$NODES"; }

alive() {  # alive PIDFILE: the process it names runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_slurm() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "slurm-wlm is not installed and installing it needs root (apt-get install slurm-wlm)"
  command -v apt-get >/dev/null || die "slurm-wlm is not installed and there is no apt-get here"
  echo "local_slurm: installing slurm-wlm (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq slurm-wlm >/dev/null \
    || die "apt-get install slurm-wlm failed"
}

write_conf() {
  local host cpus mem i=1
  host=$(hostname -s)
  # the node's real size, as slurmd sees it (each of the nodes claims the whole host)
  cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n 1)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
  cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a short credential lifetime: a requeued job may start again cred_expire seconds after it ended (default 120)
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
# no cgroups in containers: track processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
JobRequeue=1
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmctldTimeout=10
# generous: on a loaded host a slurmd can answer the controller's pings late, and a node marked DOWN for it fails
# (or requeues) the jobs on it
SlurmdTimeout=120
KillWait=10
MinJobAge=600
EOF
  for n in $(node_names); do
    echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
    i=$((i + 1))
  done
  echo "PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$CONF"
}

wait_idle() {
  local t
  for t in $(seq 1 100); do
    if [ "$(SLURM_CONF=$CONF sinfo -h -N -t idle,mix,alloc -o %N 2>/dev/null | sort -u | wc -l)" = "$NODES" ]; then
      return 0
    fi
    sleep 0.2
  done
  SLURM_CONF=$CONF sinfo -N >&2 || true
  die "nodes did not come up in 20 s; see $DIR/*.log"
}

up() {
  install_slurm
  mkdir -p "$DIR/state" "$DIR/munge"
  chmod 711 "$DIR/munge"  # munged refuses a socket folder that others can write
  if ! alive "$DIR/munged.pid"; then
    [ -f "$DIR/munge.key" ] || mungekey --create --keyfile="$DIR/munge.key" >/dev/null
    chmod 600 "$DIR/munge.key"
    munged --force --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge.key" \
      --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge.seed"
  fi
  [ -f "$CONF" ] || write_conf
  for n in $(node_names); do mkdir -p "$DIR/spool/$n"; done
  export SLURM_CONF=$CONF
  alive "$DIR/slurmctld.pid" || slurmctld -i
  for n in $(node_names); do
    alive "$DIR/slurmd-$n.pid" || slurmd -N "$n"
  done
  wait_idle
  echo "local_slurm: up ($NODES node(s): $(node_names | paste -sd,); SLURM_CONF=$CONF)"
}

down() {
  local f pid t
  if alive "$DIR/slurmctld.pid"; then  # end the jobs first, so that no job step outlives its slurmd
    SLURM_CONF=$CONF scancel --full --quiet --partition=debug 2>/dev/null || true
    for t in $(seq 1 100); do
      [ -z "$(SLURM_CONF=$CONF squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  for f in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
    alive "$f" || continue
    pid=$(cat "$f")
    kill -TERM "$pid"
    for t in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  done
  case "$DIR" in
    ""|/) die "refusing to remove $DIR" ;;
  esac
  rm -rf "$DIR"
  echo "local_slurm: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
