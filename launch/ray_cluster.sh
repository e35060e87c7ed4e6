#!/usr/bin/env bash
# Start a Ray cluster by hand and run a specdist job on it (runtime.backend=ray).
# Without a cluster, `specdist generate --set runtime.backend=ray` starts a local one itself
# (runtime.ray_address: null); this script is for an existing, possibly multi-node, cluster.
# Every node needs the same repo and .venv (the workers load the model there; nothing is shipped).
#   launch/ray_cluster.sh head     [ray start args]  start the head node (ray start --head)
#   launch/ray_cluster.sh worker   [ray start args]  join the head at HEAD_ADDRESS (ray start --address)
#   launch/ray_cluster.sh submit   [generate args]   run the job on the head node: the driver joins the
#                                                   cluster at RAY_ADDRESS and writes OUT there
#   launch/ray_cluster.sh stop                       stop Ray on this node (ray stop: every Ray process
#                                                   of this node; with RAY_TMPDIR set, only those under it)
# Settings come from environment variables with defaults:
#   RAY_PORT       head: GCS port                         (default: 6379)
#   RAY_NUM_CPUS   head/worker: CPUs to declare           (default: Ray's detection)
#   RAY_NUM_GPUS   head/worker: GPUs to declare           (default: Ray's detection)
#   HEAD_ADDRESS   worker: the head's host:port           (required, e.g. 10.0.0.1:6379)
#   RAY_ADDRESS    submit: runtime.ray_address            (default: auto, the cluster of this node)
#   RAY_TMPDIR     all: Ray's temp root (Ray reads it too): the session files, and the address file
#                  that `auto` finds, go under $RAY_TMPDIR/ray, so several clusters can share a node;
#                  `stop` then stops only the processes of that cluster   (default: unset, /tmp)
#   RAY_STOP_GRACE stop with RAY_TMPDIR: seconds before SIGKILL           (default: 10)
#   WORKERS        submit: runtime.workers (Ray actors; each needs 1 CPU, plus 1 for the coordinator)
#                                                         (default: 2)
#   CONFIG         submit: job config                     (default: configs/default.yaml)
#   OUT            submit: output directory               (default: outputs/ray)
# Example (two nodes):
#   node 0: launch/ray_cluster.sh head
#   node 1: HEAD_ADDRESS=10.0.0.1:6379 launch/ray_cluster.sh worker
#   node 0: WORKERS=8 launch/ray_cluster.sh submit --set method=speca
#   both:   launch/ray_cluster.sh stop
# Alternatively submit through the Ray job server (needs `pip install "ray[default]"` for the dashboard;
# the job runs in an uploaded copy of the working dir, so give --out an absolute path):
#   ray job submit --address http://10.0.0.1:8265 --working-dir . -- python -m specdist generate \
#     --config configs/default.yaml --set runtime.backend=ray --set runtime.ray_address=auto \
#     --set runtime.workers=8 --out /data/outputs/ray
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if [ -x .venv/bin/ray ]; then RAY=.venv/bin/ray; else RAY=ray; fi
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}
RESOURCES=()
[ -n "${RAY_NUM_CPUS:-}" ] && RESOURCES+=(--num-cpus "$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && RESOURCES+=(--num-gpus "$RAY_NUM_GPUS")
CMD=${1:-}
[ $# -gt 0 ] && shift
case "$CMD" in
  head)
    exec "$RAY" start --head --port "${RAY_PORT:-6379}" ${RESOURCES[@]+"${RESOURCES[@]}"} "$@" ;;
  worker)
    if [ -z "${HEAD_ADDRESS:-}" ]; then
      echo "launch/ray_cluster.sh worker: set HEAD_ADDRESS=host:port of the head node" >&2
      exit 2
    fi
    exec "$RAY" start --address="$HEAD_ADDRESS" ${RESOURCES[@]+"${RESOURCES[@]}"} "$@" ;;
  submit)
    exec "$PY" -m specdist generate --config "${CONFIG:-configs/default.yaml}" --set runtime.backend=ray \
      --set "runtime.ray_address=${RAY_ADDRESS:-auto}" --set "runtime.workers=${WORKERS:-2}" \
      --out "${OUT:-outputs/ray}" "$@" ;;
  stop)
    if [ -z "${RAY_TMPDIR:-}" ]; then
      exec "$RAY" stop "$@"
    fi
    # only this cluster: every Ray process names its session directory under $RAY_TMPDIR/ray/
    mine() { pgrep -f -- "${RAY_TMPDIR%/}/ray/" || true; }
    PIDS=$(mine)
    [ -z "$PIDS" ] && { echo "launch/ray_cluster.sh stop: no Ray process under $RAY_TMPDIR/ray"; exit 0; }
    kill -TERM $PIDS 2>/dev/null || true
    for _ in $(seq $((${RAY_STOP_GRACE:-10} * 10))); do
      [ -z "$(mine)" ] && { echo "launch/ray_cluster.sh stop: stopped $(echo $PIDS | wc -w) Ray processes"; exit 0; }
      sleep 0.1
    done
    LEFT=$(mine)
    [ -n "$LEFT" ] && kill -KILL $LEFT 2>/dev/null || true
    echo "launch/ray_cluster.sh stop: stopped $(echo $PIDS | wc -w) Ray processes ($(echo $LEFT | wc -w) with SIGKILL)" ;;
  *)
    usage ;;
esac
