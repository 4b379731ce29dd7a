#!/usr/bin/env bash
# Stop the single-node SLURM started by slurm-up.sh (jobs, slurmd, slurmctld, munged). Idempotent.
set -uo pipefail

stop() {  # stop the daemon whose pid file is $1, waiting up to 5 s for it to go
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$1"
}

command -v scancel >/dev/null && scancel --user="$(id -un)" 2>/dev/null
stop /run/slurm/slurmd.pid
stop /run/slurm/slurmctld.pid
stop /run/munge/munged.pid
echo "slurm-down: stopped" >&2
