#!/bin/bash
# Start a single-node Slurm cluster (munge + slurmctld + slurmd) for the slurm tests.
# Follows /work/shared/SLURM.md. Idempotent: does nothing if the node already answers.
# Env: SLURM_SCRATCH (default /tmp/sdbatch-slurm), SLURM_UP_TIMEOUT (seconds, default 60).
set -euo pipefail

D=${SLURM_SCRATCH:-/tmp/sdbatch-slurm}
TIMEOUT=${SLURM_UP_TIMEOUT:-60}

if command -v sinfo >/dev/null && sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm-up: cluster already up"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    su -s /bin/sh munge -c /usr/sbin/munged
fi

# slurm.conf
H=$(hostname -s)
CPUS=$(nproc)
# slurmd drains a node whose RealMemory exceeds what it finds, so stay ~10% below.
MEM=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p "$D/spool" "$D/state" /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$H
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmdSpoolDir=$D/spool
StateSaveLocation=$D/state
SlurmUser=root
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmctldLogFile=$D/ctld.log
SlurmdLogFile=$D/d.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# Preemption tests: jobs may be requeued, SIGTERM->SIGKILL grace is short, and a requeued job
# waits cred_expire seconds (default 120) before it may start again.
JobRequeue=1
KillWait=5
AuthInfo=cred_expire=10
# Schedule every 2 s, not every 30-60 s, so a requeued job starts soon after its wait.
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$H CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONF

# Start whichever daemon is not running (a stale pid file is harmless: they overwrite it).
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running "$D/slurmctld.pid" || slurmctld
running "$D/slurmd.pid" || slurmd

for ((i = 0; i < TIMEOUT; i++)); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
        echo "slurm-up: node $H idle (CPUs=$CPUS RealMemory=$MEM, logs in $D)"
        exit 0
    fi
    sleep 1
done
echo "slurm-up: node not idle after ${TIMEOUT}s (sinfo state: '${state:-no answer}'); see $D/ctld.log and $D/d.log" >&2
exit 1
