#!/usr/bin/env bash
# Stop the single-node SLURM started by scripts/slurm/start.sh (state in PLW_SLURM_DIR is kept;
# start.sh brings it back). Running jobs are killed with the node.
set -uo pipefail
DIR=${PLW_SLURM_DIR:-/var/lib/plw-slurm}
say() { printf '[slurm] %s\n' "$*"; }
stop() {  # name pidfile
  local pid
  pid=$(cat "$2" 2>/dev/null) || pid=""
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "stopping $1"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$2"
}
stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
stop slurmdbd "$DIR/run/slurmdbd.pid"
stop MariaDB "$DIR/run/mysqld.pid"
# munged is left running unless asked (other software may use it): PLW_SLURM_STOP_MUNGE=1
if [ "${PLW_SLURM_STOP_MUNGE:-0}" = 1 ] && [ -f /run/munge/munged.pid ]; then stop munged /run/munge/munged.pid; fi
say "stopped"
