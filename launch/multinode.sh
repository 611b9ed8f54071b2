#!/usr/bin/env bash
# Several nodes, c10d rendezvous: run the same command on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh train_grpo.py --model ... --data_root ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/multinode.sh train_grpo.py --model ... --data_root ...
# Knobs: NNODES, NODE_RANK, MASTER_ADDR (required); MASTER_PORT (29500), NGPU (8 a node), RDZV_ID (sbr).
set -euo pipefail
exec torchrun --nnodes "${NNODES:?set NNODES}" --node_rank "${NODE_RANK:?set NODE_RANK}" \
    --nproc_per_node "${NGPU:-8}" --rdzv_backend c10d \
    --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-sbr}" "$@"
