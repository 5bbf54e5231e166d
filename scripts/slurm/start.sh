#!/usr/bin/env bash
# Start a REAL single-node SLURM cluster on this (Debian/Ubuntu) machine, as root, without systemd:
# munged, MariaDB, slurmdbd (accounting, so `sacct` sees every job's end), slurmctld and slurmd.
#
#   bash scripts/slurm/start.sh        # idempotent: installs what is missing, starts what is down
#   bash scripts/slurm/stop.sh         # stops the daemons (state is kept)
#
# Environment:
#   PLW_SLURM_DIR       state, spool, pid files, logs and the MariaDB data (default /var/lib/plw-slurm)
#   PLW_SLURM_PARTITION partition name (default: debug)
#   PLW_SLURM_CLUSTER   cluster name (default: plw)
#   PLW_SLURM_MEM_MARGIN_MB  memory kept from slurmd (RealMemory = MemTotal - margin; default 1024)
#
# The configuration is generated from slurm.conf.in / slurmdbd.conf.in beside this script into
# /etc/slurm (where sbatch/sacct/sinfo look); node CPUs and memory come from this machine.
# Facts: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no systemd/cgroups needed),
# select/cons_tres with CR_Core_Memory, EnforcePartLimits=ALL (an over-sized request is rejected
# instead of pending forever), MailProg=/bin/true. The daemons start in seconds; the first run
# also installs the Debian packages (a few minutes).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DIR=${PLW_SLURM_DIR:-/var/lib/plw-slurm}
PARTITION=${PLW_SLURM_PARTITION:-debug}
CLUSTER=${PLW_SLURM_CLUSTER:-plw}
MARGIN=${PLW_SLURM_MEM_MARGIN_MB:-1024}
CTLD_PORT=6817 SLURMD_PORT=6818 DBD_PORT=6819 DB_PORT=${PLW_SLURM_DB_PORT:-3307}
ETC=/etc/slurm
PKGS="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
t0=$(date +%s)
say() { printf '[slurm] %s\n' "$*"; }
die() { printf '[slurm] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages and starts system daemons)"

# ---- 1. packages -------------------------------------------------------------------------
missing=""
for p in $PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"; done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null || die "apt-get not found; install:$missing"
  say "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  # No init system here: keep package scripts from trying to start services (a policy-rc.d that
  # is already there is left as it is).
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

# ---- 2. configuration ----------------------------------------------------------------------
mkdir -p "$DIR"/{state,spool/slurmd,run,log,mysql} "$ETC"
HOST=$(hostname -s)
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - MARGIN ))
# slurmd -C reports this machine's layout: "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 ..."
layout=$(slurmd -C 2>/dev/null | head -n1)
field() { echo "$layout" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k {print $2}'; }
CPUS=$(field CPUs); BOARDS=$(field Boards); SOCKETS=$(field SocketsPerBoard)
CORES=$(field CoresPerSocket); THREADS=$(field ThreadsPerCore)
[ -n "$CPUS" ] || { CPUS=$(nproc); BOARDS=1; SOCKETS=1; CORES=$CPUS; THREADS=1; }
DB_PASS_FILE="$DIR/db.pass"
[ -s "$DB_PASS_FILE" ] || { (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$DB_PASS_FILE"); }
DB_PASS=$(cat "$DB_PASS_FILE")
render() {
  sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@PARTITION@|$PARTITION|g" \
      -e "s|@CPUS@|$CPUS|g" -e "s|@BOARDS@|$BOARDS|g" -e "s|@SOCKETS@|$SOCKETS|g" -e "s|@CORES@|$CORES|g" \
      -e "s|@THREADS@|$THREADS|g" -e "s|@MEM@|$MEM_MB|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
      -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" \
      -e "s|@DB_PASS@|$DB_PASS|g" "$1"
}
changed=0
install_conf() {  # template target mode
  local new; new=$(render "$1")
  if [ ! -f "$2" ] || [ "$new" != "$(cat "$2")" ]; then
    printf '%s\n' "$new" > "$2"; changed=1
  fi
  chmod "$3" "$2"
}
install_conf "$HERE/slurm.conf.in" "$ETC/slurm.conf" 644
install_conf "$HERE/slurmdbd.conf.in" "$ETC/slurmdbd.conf" 600

alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }
wait_for() {  # description timeout_s command...
  local what=$1 limit=$2; shift 2
  for ((i = 0; i < limit * 5; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what did not come up within ${limit}s (logs: $DIR/log/)"
}
stop_pid() { if alive "$1"; then kill "$(cat "$1" 2>/dev/null)" 2>/dev/null || true; for _ in $(seq 50); do alive "$1" || break; sleep 0.2; done; fi; }
if [ "$changed" = 1 ]; then
  say "configuration written to $ETC (node $HOST: $CPUS CPUs, RealMemory ${MEM_MB} MB)"
  # daemons started with another configuration are restarted
  stop_pid "$DIR/run/slurmd.pid"; stop_pid "$DIR/run/slurmctld.pid"; stop_pid "$DIR/run/slurmdbd.pid"
fi

# ---- 3. munge ------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
  else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
  wait_for munged 20 bash -c 'munge -n | unmunge'
fi

# ---- 4. MariaDB (accounting storage) -------------------------------------------------------
MYSOCK="$DIR/run/mysqld.sock"
chown -R mysql:mysql "$DIR/mysql"
if [ ! -d "$DIR/mysql/mysql" ]; then
  say "initialising MariaDB in $DIR/mysql"
  mariadb-install-db --user=mysql --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
    >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: see $DIR/log/mariadb-install.log"
fi
if ! mariadb-admin --socket="$MYSOCK" ping >/dev/null 2>&1; then
  say "starting MariaDB (127.0.0.1:$DB_PORT)"
  chown mysql:mysql "$DIR/run" "$DIR/log"
  nohup mariadbd --user=mysql --datadir="$DIR/mysql" --socket="$MYSOCK" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --pid-file="$DIR/run/mysqld.pid" --log-error="$DIR/log/mariadb.log" \
    --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
  wait_for MariaDB 60 mariadb-admin --socket="$MYSOCK" ping
fi
mariadb --socket="$MYSOCK" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL

# ---- 5. slurmdbd, slurmctld, slurmd --------------------------------------------------------
if ! alive "$DIR/run/slurmdbd.pid"; then
  say "starting slurmdbd"
  slurmdbd
  wait_for slurmdbd 60 sacctmgr -n list cluster
fi
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if ! alive "$DIR/run/slurmctld.pid"; then
  say "starting slurmctld"
  slurmctld
  wait_for slurmctld 60 scontrol ping
fi
if ! alive "$DIR/run/slurmd.pid"; then
  say "starting slurmd"
  slurmd
fi
node_ready() { sinfo -h -N -n "$HOST" -o '%t' | grep -Eq '^(idle|mix|alloc|comp)'; }
for ((i = 0; i < 150; i++)); do
  node_ready && break
  state=$(sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null || true)
  case "$state" in down*|drain*|drng*|fail*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;; esac
  sleep 0.2
done
node_ready || die "node $HOST is not ready: $(sinfo -N 2>&1 | tail -n +2) (logs: $DIR/log/)"
say "ready in $(( $(date +%s) - t0 ))s: $(sinfo -h -o '%P %a %D nodes %c CPUs %m MB' | head -n1); accounting: $(sacctmgr -n -P list cluster format=cluster | tr '\n' ' ')"
