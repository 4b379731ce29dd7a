#!/usr/bin/env bash
# Start a single-node SLURM on this machine (CI, containers): munge, slurmctld, slurmd as root,
# no systemd, no cgroups. Idempotent: installs only what is missing, reuses running daemons.
#
#   bash cluster/ci/slurm-up.sh      # then: sinfo; daskptycho reconstruct ... --cluster slurm
#   bash cluster/ci/slurm-down.sh
#
# Every finished job is logged by jobcomp/filetxt to $SLURM_JOBCOMP_LOG (default
# /var/log/slurm/jobcomp.log): the witness the tests read, since squeue forgets
# finished jobs within minutes and sacct needs slurmdbd.
set -euo pipefail

JOBCOMP_LOG=${SLURM_JOBCOMP_LOG:-/var/log/slurm/jobcomp.log}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf

log() { echo "slurm-up: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages and starts daemons)"
    exit 1
fi

# 1. packages (Debian/Ubuntu), skipped when present
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        log "slurmctld/slurmd/munge are missing and apt-get is not available"
        exit 1
    fi
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

HOST=$(hostname -s)

# 2. munge: a key and the daemon
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating a munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged --force
    else
        munged --force
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
fi

# 3. slurm.conf for one node with this machine's real CPUs and memory
mkdir -p $CONF_DIR /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
NODE_LINE=$(slurmd -C | head -1)      # "NodeName=host CPUs=... RealMemory=..."
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")
BOARDS=$(sed -n 's/.*\(Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*\).*/\1/p' <<<"$NODE_LINE")
# keep a little memory for the daemons; slurmd refuses a node that claims more than it has
MEM=$(( MEM > 1024 ? MEM - 512 : MEM ))
NEW_CONF=$(cat <<CONFEOF
# written by cluster/ci/slurm-up.sh: a single-node SLURM for CI
ClusterName=daskptycho-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups, no systemd: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# CPUs (not whole cores) are the unit: a 1-CPU job must not take a core's two hyperthreads
SelectTypeParameters=CR_CPU_Memory
# jobs that do not ask for memory get 1 GB per CPU, not the whole node
DefMemPerCPU=1024
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs, one line each: the witness that jobs really ran
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_LOG
# finished jobs stay visible to squeue/scontrol for 5 minutes
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS $BOARDS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONFEOF
)
CHANGED=0
if [ ! -f $CONF ] || [ "$(cat $CONF)" != "$NEW_CONF" ]; then
    printf '%s\n' "$NEW_CONF" > $CONF
    CHANGED=1
fi
# no cgroup.conf: with ProctrackType=proctrack/linuxproc and TaskPlugin=task/none slurmd needs no
# cgroups (and Slurm 22.05 knows no "CgroupPlugin=disabled"; drop such a file from other attempts)
if [ -f $CONF_DIR/cgroup.conf ] && grep -q '^CgroupPlugin=disabled' $CONF_DIR/cgroup.conf; then
    rm -f $CONF_DIR/cgroup.conf
fi
touch "$JOBCOMP_LOG"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ $CHANGED = 1 ] && { running /run/slurm/slurmctld.pid || running /run/slurm/slurmd.pid; }; then
    log "slurm.conf changed: restarting the daemons"
    for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
        running $f && kill "$(cat $f)" && sleep 1
    done
fi

# 4. the daemons
if ! running /run/slurm/slurmctld.pid; then
    log "starting slurmctld"
    slurmctld -i
fi
if ! running /run/slurm/slurmd.pid; then
    log "starting slurmd"
    slurmd
fi

# 5. wait for the node to be idle (or mixed/allocated: already running jobs)
for i in $(seq 60); do
    STATE=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1 || true)
    case "$STATE" in
        idle|mix|alloc) log "node $HOST is $STATE ($CPUS CPUs, ${MEM} MB)"; exit 0 ;;
        down*|drain*|inval*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
log "node $HOST did not become idle (state: ${STATE:-unknown}); see /var/log/slurm/slurmctld.log and slurmd.log"
exit 1
