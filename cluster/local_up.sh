#!/usr/bin/env bash
# A local Ray cluster for kvpipe: a head on 127.0.0.1 (plus optional extra nodes on the same
# machine, for trying multi-node placement), with its own temp dir, stopped by process group
# (never `ray stop`, which would stop every Ray on the machine).
#
#   cluster/local_up.sh up [--cpus 2] [--workers 0]   # start; prints the addresses
#   cluster/local_up.sh status
#   cluster/local_up.sh down
#
# Then: ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- \
#           python -m jobs run jobs/examples/passkey.yaml
# or run a driver here with RAY_ADDRESS=127.0.0.1:$RAY_PORT kvpipe run ...
set -euo pipefail

STATE=${KVPIPE_RAY_STATE:-/tmp/kvpipe-ray}
RAY_PORT=${RAY_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8275}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

cmd=${1:-up}
shift || true
cpus=2
workers=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpus) cpus=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

start_node() {  # name, ray start arguments...
  local name=$1; shift
  setsid ray start --block --disable-usage-stats "$@" >"$STATE/$name.log" 2>&1 &
  echo $! >>"$STATE/pids"
}

case $cmd in
  up)
    if [ -s "$STATE/pids" ]; then echo "already up (see $STATE); run: $0 down" >&2; exit 1; fi
    mkdir -p "$STATE/tmp"
    start_node head --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --num-cpus="$cpus" --resources='{"kvpipe_slot": 1}' --temp-dir="$STATE/tmp"
    for _ in $(seq 1 120); do
      curl -fsS "http://127.0.0.1:$DASHBOARD_PORT/api/version" >/dev/null 2>&1 && break
      sleep 1
    done
    for i in $(seq 1 "$workers"); do
      start_node "worker$i" --address="127.0.0.1:$RAY_PORT" --node-ip-address=127.0.0.1 \
        --num-cpus="$cpus" --resources='{"kvpipe_slot": 1}'
    done
    echo "Ray is up: RAY_ADDRESS=127.0.0.1:$RAY_PORT (drivers), http://127.0.0.1:$DASHBOARD_PORT (jobs, dashboard)"
    ;;
  status)
    RAY_ADDRESS="127.0.0.1:$RAY_PORT" ray status
    ;;
  down)
    [ -s "$STATE/pids" ] || { echo "not up"; exit 0; }
    while read -r pid; do kill -TERM -- "-$pid" 2>/dev/null || true; done <"$STATE/pids"
    sleep 5
    while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done <"$STATE/pids"
    rm -f "$STATE/pids"
    echo "stopped"
    ;;
  *) echo "usage: $0 up|status|down [--cpus N] [--workers N]" >&2; exit 2 ;;
esac
