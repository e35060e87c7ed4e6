#!/usr/bin/env bash
# Run one specdist generation job under torchrun (runtime.backend=torchrun): rank 0 coordinates and
# writes the outputs, the other ranks are WORKERS reference workers, each a gang of GANG_SIZE ranks
# (context parallelism inside a gang, speculation across gangs). Every rank runs the same command.
# Settings come from environment variables with defaults; extra arguments go to `specdist generate`
# (more `--set key=value` overrides).
#   WORKERS          reference workers (gangs)                     (default: 2)
#   GANG_SIZE        ranks per worker (runtime.gang_size; Ulysses degree = GANG_SIZE on CPU) (default: 1)
#   NNODES           nodes                                         (default: 1)
#   NPROC_PER_NODE   processes on this node (default: WORLD/NNODES; WORLD = WORKERS*GANG_SIZE+1 on one node)
#   NODE_RANK        this node's index, 0..NNODES-1; node 0 holds rank 0       (default: 0)
#   MASTER_ADDR      address of node 0, reachable from every node  (default: 127.0.0.1)
#   MASTER_PORT      rendezvous port on node 0                     (default: 29500)
#   CONFIG           job config                                    (default: configs/default.yaml)
#   OUT              output directory, written by rank 0 on node 0 (default: outputs/torchrun)
# The processes of all nodes must add up to WORLD = WORKERS*GANG_SIZE + 1 (checked here on one node
# and by specdist on every rank). With gangs, node 0 runs the coordinator plus its gangs, so nodes run
# different counts: give each node its NPROC_PER_NODE (specdist.runtime.parallel_dims.ParallelDims
# .procs_per_node; gangs go round-robin over the nodes, a gang never spans nodes).
# One node (`torchrun --standalone`, MASTER_* unused):
#   WORKERS=3 launch/torchrun.sh --set method=speca
#   WORKERS=2 GANG_SIZE=2 launch/torchrun.sh --set method=speca --set cache.granularity=output
# Several nodes (static rendezvous at MASTER_ADDR:MASTER_PORT; same repo, .venv and config on each):
#   node 0: NNODES=2 NODE_RANK=0 NPROC_PER_NODE=4 WORKERS=7 MASTER_ADDR=10.0.0.1 launch/torchrun.sh
#   node 1: NNODES=2 NODE_RANK=1 NPROC_PER_NODE=4 WORKERS=7 MASTER_ADDR=10.0.0.1 launch/torchrun.sh
# Two nodes, 4 gangs of 2 (node 0: coordinator + gangs 0, 2 = 5 processes; node 1: gangs 1, 3 = 4):
#   node 0: NNODES=2 NODE_RANK=0 NPROC_PER_NODE=5 WORKERS=4 GANG_SIZE=2 MASTER_ADDR=10.0.0.1 launch/torchrun.sh
#   node 1: NNODES=2 NODE_RANK=1 NPROC_PER_NODE=4 WORKERS=4 GANG_SIZE=2 MASTER_ADDR=10.0.0.1 launch/torchrun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-2}
GANG_SIZE=${GANG_SIZE:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/default.yaml}
OUT=${OUT:-outputs/torchrun}
WORLD=$((WORKERS * GANG_SIZE + 1))
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ $((WORLD % NNODES)) -ne 0 ]; then
    echo "launch/torchrun.sh: WORKERS*GANG_SIZE+1=$WORLD processes do not split evenly over NNODES=$NNODES;" \
         "set NPROC_PER_NODE on each node" >&2
    exit 2
  fi
  NPROC_PER_NODE=$((WORLD / NNODES))
fi
if [ "$NNODES" -eq 1 ] && [ "$NPROC_PER_NODE" -ne "$WORLD" ]; then
  echo "launch/torchrun.sh: NPROC_PER_NODE=$NPROC_PER_NODE but WORKERS=$WORKERS × GANG_SIZE=$GANG_SIZE needs" \
       "WORLD_SIZE=WORKERS*GANG_SIZE+1=$WORLD (rank 0 coordinates)" >&2
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
  --set runtime.backend=torchrun --set "runtime.workers=$WORKERS" --set "runtime.gang_size=$GANG_SIZE" \
  --out "$OUT" "$@"
