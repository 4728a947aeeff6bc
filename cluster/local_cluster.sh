#!/usr/bin/env bash
# Start or stop a Ray cluster of one head and N worker nodes on this machine, for development and
# tests. Each node gets its own loopback address (head 127.0.0.2, workers 127.0.0.3, 127.0.0.4,
# ...), not 127.0.0.1: Ray rejects joining nodes while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the
# setting that keeps a single embedded instance on 127.0.0.1), and without it Ray replaces
# 127.0.0.1 by the machine's external address. Other loopback addresses are kept as given, so every
# socket stays on 127.0.0.0/8.
#
# Usage:
#   cluster/local_cluster.sh start [WORKERS]   # default 1 worker node
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop              # ends only the processes this cluster started
#   cluster/local_cluster.sh kill-worker I     # SIGKILL worker node I, as when a machine is lost
#
# Settings (environment): CLUSTER_DIR (state and Ray temp dir, default /tmp/phases-local-cluster),
# GCS_PORT (default 6390), DASHBOARD_PORT (default 8275), AGENT_PORT (default 52400), CPUS_PER_NODE
# (default 1), RAY (the ray executable, default: `ray` on PATH).
# Submit to it with: phases submit SPEC --address http://127.0.0.2:$DASHBOARD_PORT --storage DIR
set -euo pipefail

CLUSTER_DIR="${CLUSTER_DIR:-/tmp/phases-local-cluster}"
GCS_PORT="${GCS_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8275}"
CPUS_PER_NODE="${CPUS_PER_NODE:-1}"
# Each node's dashboard agent also listens on 127.0.0.1, so every node on this machine needs its own
# agent port (node i gets AGENT_PORT + i), apart from any other Ray instance's default 52365.
AGENT_PORT="${AGENT_PORT:-52400}"
HEAD_IP=127.0.0.2
RAY="${RAY:-$(command -v ray || true)}"
if [[ -z "$RAY" ]]; then
  echo "error: the ray executable was not found; activate the project's environment (.venv/bin) or set RAY" >&2
  exit 2
fi

export RAY_USAGE_STATS_ENABLED=0
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
# Token authentication on every node (Ray 2.59 and later turn it on for clusters started here):
# the token comes from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH if set, else from a file this script
# generates. Clients (phases submit, phases jobs) need the same two variables; `start` prints them.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$CLUSTER_DIR/auth_token}"
fi

# PIDs of this cluster. Ray's daemons carry the temp dir (or the session dir under it) in their
# command lines, and the Ray client server carries the GCS address. Their descendants (dashboard and
# runtime-env agents, workers) rename themselves, so they are collected through the process tree.
cluster_pids() {
  local roots pid
  roots="$( { pgrep -f -- "$CLUSTER_DIR/ray" || true; pgrep -f -- "--address=$HEAD_IP:$GCS_PORT" || true; } | sort -u)"
  for pid in $roots; do
    echo "$pid"
    descendants "$pid"
  done | sort -un | grep -vxF -f <(ancestors) || true
}

# This script and the processes that called it, which a pattern must never select.
ancestors() {
  local pid=$$
  while [[ -n "$pid" && "$pid" != 0 ]]; do
    echo "$pid"
    pid="$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null || true)"
  done
}

descendants() {
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "$child"
    descendants "$child"
  done
}

start() {
  local workers="${1:-1}"
  # Ray puts Unix sockets under $CLUSTER_DIR/ray/session_<date>_<pid>/sockets/, and a socket path
  # may not exceed 107 bytes, so a long directory makes the dashboard fail at start.
  if (( ${#CLUSTER_DIR} > 40 )); then
    echo "error: CLUSTER_DIR=$CLUSTER_DIR is ${#CLUSTER_DIR} characters; Ray's socket paths under it would exceed the 107-byte limit. Use a directory of at most 40 characters, such as /tmp/phases-local-cluster" >&2
    exit 2
  fi
  if [[ -n "$(cluster_pids)" ]]; then
    echo "error: a cluster is already running from $CLUSTER_DIR; run '$0 stop' first" >&2
    exit 2
  fi

  mkdir -p "$CLUSTER_DIR/ray"
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$RAY_AUTH_TOKEN_PATH")
  fi
  echo "starting head node on $HEAD_IP (GCS port $GCS_PORT, dashboard http://$HEAD_IP:$DASHBOARD_PORT)"
  "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
    --dashboard-host="$HEAD_IP" --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
    --dashboard-agent-listen-port="$AGENT_PORT" --ray-client-server-port=$((GCS_PORT + 1)) \
    --num-cpus="$CPUS_PER_NODE" --num-gpus=0 --temp-dir="$CLUSTER_DIR/ray" --disable-usage-stats >"$CLUSTER_DIR/head.log" 2>&1 \
    || { echo "error: the head node failed to start; see $CLUSTER_DIR/head.log" >&2; exit 1; }
  for ((i = 1; i <= workers; i++)); do
    local ip="127.0.0.$((2 + i))"
    echo "starting worker node $i on $ip"
    "$RAY" start --address="$HEAD_IP:$GCS_PORT" --node-ip-address="$ip" --num-cpus="$CPUS_PER_NODE" --num-gpus=0 \
      --dashboard-agent-listen-port=$((AGENT_PORT + i)) \
      --temp-dir="$CLUSTER_DIR/ray" --disable-usage-stats >"$CLUSTER_DIR/worker-$i.log" 2>&1 \
      || { echo "error: worker node $i failed to start; see $CLUSTER_DIR/worker-$i.log" >&2; exit 1; }
  done

  cluster_pids >"$CLUSTER_DIR/pids"
  echo "cluster up: $((workers + 1)) nodes; dashboard and Jobs API at http://$HEAD_IP:$DASHBOARD_PORT"
  if [[ "$RAY_AUTH_MODE" == token ]]; then
    echo "clients need: export RAY_AUTH_MODE=token${RAY_AUTH_TOKEN_PATH:+ RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH}"
  fi
}

stop() {
  local pids
  pids="$(cluster_pids)"
  if [[ -z "$pids" ]]; then
    echo "no cluster running from $CLUSTER_DIR"
    return 0
  fi
  echo "stopping $(echo "$pids" | wc -l) processes of the cluster in $CLUSTER_DIR"
  # shellcheck disable=SC2086
  kill $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    [[ -z "$(cluster_pids)" ]] && break
    sleep 0.5
  done
  pids="$(cluster_pids)"
  # shellcheck disable=SC2086
  [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null || true
  echo "cluster stopped"
}

kill_worker() {
  local ip="127.0.0.$((2 + $1))" roots pid
  roots="$(pgrep -f -- "--node.ip.address=$ip" || true)"
  if [[ -z "$roots" ]]; then
    echo "error: no worker node on $ip" >&2
    exit 2
  fi
  # shellcheck disable=SC2046
  kill -9 $(for pid in $roots; do echo "$pid"; descendants "$pid"; done | sort -un) 2>/dev/null || true
  echo "killed worker node $1 ($ip)"
}

status() {
  local pids
  pids="$(cluster_pids)"
  if [[ -z "$pids" ]]; then
    echo "no cluster running from $CLUSTER_DIR"
    return 1
  fi
  "$RAY" status --address="$HEAD_IP:$GCS_PORT"
}

case "${1:-}" in
  start) start "${2:-1}" ;;
  stop) stop ;;
  status) status ;;
  kill-worker) kill_worker "${2:?worker index required}" ;;
  *) echo "usage: $0 start [WORKERS] | status | stop | kill-worker I" >&2; exit 2 ;;
esac
