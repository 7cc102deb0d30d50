#!/usr/bin/env bash
# Multi-node MM1 training with the GPU image: one container per node, host networking (NCCL
# talks node to node), every GPU of the node, the shared data and run folders mounted.
# Run on each node with NODE_RANK=0..N-1 and MASTER_ADDR the first node's address:
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 docker/torchrun-multinode.sh recipes/train/mm1-3b.yaml
# torchrun starts one process per GPU; the trainer (train/trainer.py) takes RANK, WORLD_SIZE and
# LOCAL_RANK from it, shards with FSDP2 when the recipe says so, and resumes from the newest
# complete checkpoint in the run folder after a restart.
set -euo pipefail
RECIPE=${1:?usage: $0 TRAIN_RECIPE [mm1 train options]}
shift
exec docker run --rm --gpus all --network host --ipc host \
  -v "${DATA_DIR:-/data}:/data" \
  -e NCCL_DEBUG="${NCCL_DEBUG:-WARN}" \
  mm1-pipeline:gpu \
  torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
    --rdzv-id "${RUN_ID:-mm1}" \
    -m tools.cli train "/opt/mm1-pipeline/${RECIPE}" --run-dir "/data/runs/${RUN_ID:-mm1}" "$@"
