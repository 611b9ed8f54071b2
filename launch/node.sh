#!/usr/bin/env bash
# One node: launch/node.sh SCRIPT [ARGS...]   e.g. NGPU=8 launch/node.sh train_grpo.py --model ... --data_root ...
# Knobs: NGPU (processes, default 8).
set -euo pipefail
exec torchrun --standalone --nproc_per_node "${NGPU:-8}" "$@"
