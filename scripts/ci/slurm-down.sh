#!/bin/bash
# Stop the daemons started by slurm-up.sh, by their pid files.
D=${SLURM_SCRATCH:-/tmp/sdbatch-slurm}
for f in "$D/slurmd.pid" "$D/slurmctld.pid" /run/munge/munged.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
exit 0
