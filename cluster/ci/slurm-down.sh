#!/usr/bin/env bash
# Stop the single-node SLURM started by slurm-up.sh (slurmd, slurmctld, munged). Idempotent.
set -uo pipefail
scancel --user="$(id -un)" 2>/dev/null || true
for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
    if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
        kill "$(cat "$f")"
        for _ in $(seq 50); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$f"
done
MUNGE_PID=/run/munge/munged.pid
if [ -f "$MUNGE_PID" ] && kill -0 "$(cat "$MUNGE_PID")" 2>/dev/null; then
    kill "$(cat "$MUNGE_PID")"
fi
echo "slurm-down: stopped" >&2
