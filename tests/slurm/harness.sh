#!/usr/bin/env bash
# A real single-node Slurm for tests, started by hand (no systemd), bound to 127.0.0.1, all state
# (config, munge key and socket, spool, logs, PIDs) under one folder.
#
#   tests/slurm/harness.sh start DIR   start munged, slurmctld, slurmd; wait until the node is idle;
#                                      print the environment to use it (eval it):
#                                      export SLURM_CONF=DIR/slurm.conf PATH=DIR/bin:$PATH
#   tests/slurm/harness.sh stop DIR    cancel jobs, stop the three daemons by their PIDs
#   tests/slurm/harness.sh status DIR  exit 0 when all three daemons are running
#
# Needs Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge; tested with 22.05).
# Idempotent: start on a running harness only prints the export; stop on a stopped one does nothing.
# No accounting (no slurmdbd): use `slurm-status-command: squeue` (tests/slurm/profile/config.yaml).
# DIR/bin holds wrappers of the Slurm client commands that set SLURM_CONF: the plugin's job step
# (snakemake-executor-plugin-slurm-jobstep 0.6) drops every SLURM_* variable before it calls srun,
# so srun inside a job would not find a slurm.conf outside /etc/slurm.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cmd="${1:-}"
dir="${2:-}"
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: $0 start|stop|status DIR" >&2
  exit 2
fi
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"
daemons=(munged slurmctld slurmd)

alive() {  # a process that exists and is not a zombie (an init that does not reap leaves those)
  kill -0 "$1" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]
}

pid_of() {  # the PID a daemon wrote, if that process is still alive
  local f="$dir/$1.pid" p
  [[ -s "$f" ]] || return 1
  p="$(cat "$f")"
  alive "$p" || return 1
  echo "$p"
}

running() {
  local d
  for d in "${daemons[@]}"; do pid_of "$d" >/dev/null || return 1; done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  # The machine's real layout, as slurmd itself detects it.
  local hw; hw="$(slurmd -C | head -1)"
  field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$hw"; }
  local node; node="$(hostname -s)"
  local ctld_port slurmd_port
  ctld_port="$(free_port)"
  slurmd_port="$(free_port)"
  while [[ "$slurmd_port" == "$ctld_port" ]]; do slurmd_port="$(free_port)"; done
  sed -e "s|@STATE@|$dir|g" -e "s|@USER@|$(id -un)|g" \
      -e "s|@CTLD_HOST@|$node|g" -e "s|@NODE@|$node|g" -e "s|@NODE_HOSTNAME@|$node|g" \
      -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
      -e "s|@CPUS@|$(field CPUs)|g" -e "s|@BOARDS@|$(field Boards)|g" \
      -e "s|@SOCKETS@|$(field SocketsPerBoard)|g" -e "s|@CORES@|$(field CoresPerSocket)|g" \
      -e "s|@THREADS@|$(field ThreadsPerCore)|g" -e "s|@MEM@|$(field RealMemory)|g" \
      "$here/slurm.conf.in" >"$conf"
  echo "$node" >"$dir/nodename"
  mkdir -p "$dir/bin"
  local c real
  for c in srun sbatch squeue scancel scontrol sinfo sacct; do
    real="$(PATH="${PATH//$dir\/bin:/}" command -v "$c")" || continue
    printf '#!/bin/sh\nSLURM_CONF=%q exec %q "$@"\n' "$conf" "$real" >"$dir/bin/$c"
    chmod +x "$dir/bin/$c"
  done
}

print_env() { echo "export SLURM_CONF=$conf PATH=$dir/bin:\$PATH"; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local t="$1" what="$2"; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > end)); then
      echo "harness: timed out waiting for $what; logs in $dir/log" >&2
      tail -n 20 "$dir"/log/*.log >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

node_idle() { sinfo -h -N -o '%T' | grep -qx idle; }

start() {
  for c in munged slurmctld slurmd sinfo sbatch squeue; do
    command -v "$c" >/dev/null || { echo "harness: $c not found (apt-get install -y slurm-wlm munge)" >&2; exit 1; }
  done
  if running; then
    print_env
    return 0
  fi
  stop_daemons  # a half-started harness: stop what is left first
  mkdir -p "$dir/munge" "$dir/ctld" "$dir/spool" "$dir/log"
  chmod 700 "$dir/munge"
  [[ -s "$dir/munge/munge.key" ]] || { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none; }
  chmod 600 "$dir/munge/munge.key"
  write_conf

  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
  wait_for 20 munged pid_of munged
  # -c: a clean start (no saved jobs); -i: ignore state errors.
  slurmctld -c -i -f "$conf"
  wait_for 30 slurmctld scontrol ping
  slurmd -f "$conf" -N "$(cat "$dir/nodename")"
  wait_for 60 "the node to be idle" node_idle
  running || { echo "harness: a daemon exited; logs in $dir/log" >&2; exit 1; }
  print_env
}

stop_daemons() {
  local d p end
  for d in slurmd slurmctld munged; do
    p="$(pid_of "$d")" || continue
    kill -TERM "$p" 2>/dev/null || true
    end=$((SECONDS + 20))
    while alive "$p" && ((SECONDS < end + 10)); do
      if ((SECONDS > end)); then kill -KILL "$p" 2>/dev/null || true; fi
      sleep 0.2
    done
  done
  rm -f "$dir"/*.pid
}

stop() {
  if pid_of slurmctld >/dev/null; then
    # Cancel this cluster's jobs and let slurmd reap their steps before it goes down.
    scancel --full --user "$(id -un)" 2>/dev/null || true
    local end=$((SECONDS + 30))
    while [[ -n "$(squeue -h -t running,completing,pending 2>/dev/null)" ]] && ((SECONDS < end)); do sleep 0.5; done
  fi
  stop_daemons
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) running ;;
  *) echo "usage: $0 start|stop|status DIR" >&2; exit 2 ;;
esac
