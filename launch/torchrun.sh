#!/usr/bin/env bash
# Run one specdist generation job under torchrun (runtime.backend=torchrun): rank 0 coordinates and
# writes the outputs, ranks 1..WORKERS are reference workers. Every rank runs the same command.
# Settings come from environment variables with defaults; extra arguments go to `specdist generate`
# (more `--set key=value` overrides).
#   WORKERS          reference workers = world size - 1            (default: 2)
#   NNODES           nodes                                         (default: 1)
#   NPROC_PER_NODE   processes on this node    (default: (WORKERS+1)/NNODES; WORKERS+1 on one node)
#   NODE_RANK        this node's index, 0..NNODES-1; node 0 holds rank 0       (default: 0)
#   MASTER_ADDR      address of node 0, reachable from every node  (default: 127.0.0.1)
#   MASTER_PORT      rendezvous port on node 0                     (default: 29500)
#   CONFIG           job config                                    (default: configs/default.yaml)
#   OUT              output directory, written by rank 0 on node 0 (default: outputs/torchrun)
# WORLD_SIZE = NNODES * NPROC_PER_NODE must equal WORKERS + 1 (checked here and by specdist).
# One node (`torchrun --standalone`, MASTER_* unused):
#   WORKERS=3 launch/torchrun.sh --set method=speca
# Several nodes (static rendezvous at MASTER_ADDR:MASTER_PORT; same repo, .venv and config on each):
#   node 0: NNODES=2 NODE_RANK=0 NPROC_PER_NODE=4 WORKERS=7 MASTER_ADDR=10.0.0.1 launch/torchrun.sh
#   node 1: NNODES=2 NODE_RANK=1 NPROC_PER_NODE=4 WORKERS=7 MASTER_ADDR=10.0.0.1 launch/torchrun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/default.yaml}
OUT=${OUT:-outputs/torchrun}
WORLD=$((WORKERS + 1))
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ $((WORLD % NNODES)) -ne 0 ]; then
    echo "launch/torchrun.sh: WORKERS+1=$WORLD processes do not split evenly over NNODES=$NNODES; set NPROC_PER_NODE" >&2
    exit 2
  fi
  NPROC_PER_NODE=$((WORLD / NNODES))
fi
if [ $((NNODES * NPROC_PER_NODE)) -ne "$WORLD" ]; then
  echo "launch/torchrun.sh: NNODES*NPROC_PER_NODE=$((NNODES * NPROC_PER_NODE)) but WORKERS=$WORKERS needs" \
       "WORLD_SIZE=WORKERS+1=$WORLD (rank 0 coordinates)" >&2
  exit 2
fi
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if [ "$NNODES" -eq 1 ]; then
  LAUNCH=(--standalone --nproc-per-node "$NPROC_PER_NODE")
else
  LAUNCH=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
          --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
# `python -m torch.distributed.run` is torchrun; it starts every rank with this same interpreter
exec "$PY" -m torch.distributed.run "${LAUNCH[@]}" -m specdist generate --config "$CONFIG" \
  --set runtime.backend=torchrun --set "runtime.workers=$WORKERS" --out "$OUT" "$@"
