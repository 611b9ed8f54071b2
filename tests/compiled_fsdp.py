"""Run under torchrun (2 ranks, CPU, gloo): train_grpo.main on the FSDP2-sharded tiny policy with
--compile_decode true, twice in one process group:
  "compiled": the real torch.compile'd decoding step (Inductor's code on the CPU);
  "graphs":   CUDA graphs emulated (tests/emulated_graphs.py) around the eager static step, so every
              replay is checked to read the addresses its recording read, across rollouts separated
              by training steps (FSDP2 reshards and all-gathers the weights again in between).
Prints {"compiled": [metrics...], "graphs": [metrics...], "captured": n, "freed": n, "invalidations": n}
as JSON on rank 0."""
import json
import os
import sys
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch.distributed as dist  # noqa: E402

import emulated_graphs  # noqa: E402
import sbr.graphs  # noqa: E402
import sbr.policy  # noqa: E402
import train_grpo  # noqa: E402
from sbr.common import init_distributed  # noqa: E402
from sbr.decode import decode_step  # noqa: E402

tiny, out = sys.argv[1], sys.argv[2]
d = init_distributed(always=True)
cfg = replace(train_grpo.tiny_config(), model=os.path.join(tiny, "qwen2_vl"), data_root=os.path.join(tiny, "data"),
              reward_module="tests.toy_rewards", reward_funcs=["toy_even_length"], max_completion_length=16,
              max_steps=3, save_every=10**6, export=False, compile_decode=True)
result = {"compiled": train_grpo.main(replace(cfg, out_dir=os.path.join(out, "compiled")))}
sbr.graphs.capture = emulated_graphs.capture
steps = []
sbr.policy.static_step = lambda device: steps.append(sbr.graphs.StepGraphs(decode_step)) or steps[-1]
result["graphs"] = train_grpo.main(replace(cfg, out_dir=os.path.join(out, "graphs")))
result.update(captured=len(emulated_graphs.recorded), freed=sum(g.freed for g in emulated_graphs.recorded),
              invalidations=steps[0].invalidations)
if d.rank == 0:
    print(json.dumps(result))
dist.destroy_process_group()
