"""Run under torchrun (2 ranks, CPU): each rank's advantages with scale="batch" as train_grpo.py
computes them; rank 0 prints every rank's as JSON."""
import json

import torch
import torch.distributed as dist

from sbr.common import init_distributed
from sbr.training import step_advantages

d = init_distributed(always=True)
rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]][d.rank])     # rank 1's std differs
out = [None] * d.world_size
dist.all_gather_object(out, step_advantages(rewards, 4, "batch", d.device).tolist())
if d.rank == 0:
    print("RESULT " + json.dumps(out))
dist.barrier()
dist.destroy_process_group()
