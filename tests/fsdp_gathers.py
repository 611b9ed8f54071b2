"""Run under torchrun (2 ranks, CPU): one rollout of the FSDP2-sharded policy (sample() gathers the
parameters once, sbr.fsdp.gathered), counting its all-gathers, beside the same rollout of an unsharded
copy on the same rank; prints both as JSON on rank 0."""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sbr.collate import VideoCollator, model_inputs
from sbr.common import init_distributed
from sbr.data import load_seedbench
from sbr.fsdp import gathered, shard
from sbr.model import load_model, load_processor, visual_token_ids
from sbr.policy import Policy
from sbr.rollout import sample

tiny = sys.argv[1]
d = init_distributed(always=True)
processor = load_processor(f"{tiny}/qwen2_vl")
plain = Policy(load_model(f"{tiny}/qwen2_vl"), suppress_token_ids=visual_token_ids(processor.tokenizer))
policy = shard(Policy(load_model(f"{tiny}/qwen2_vl"), suppress_token_ids=plain.suppress_token_ids), bf16=False)
samples = load_seedbench(f"{tiny}/data/annotations/validation_L1.jsonl", f"{tiny}/data")
collator = VideoCollator(processor)
inputs = model_inputs(collator([collator.load(samples[1 + d.rank])]))
eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]

count = [0]


def counted(fn):
    def wrapper(*args, **kwargs):
        count[0] += 1
        return fn(*args, **kwargs)
    return wrapper


for name in ("all_gather_into_tensor", "all_gather_single"):     # FSDP2 uses one or the other, by version
    if hasattr(dist, name):
        setattr(dist, name, counted(getattr(dist, name)))
result = {}
decode = policy.decode
vision_sharded = []


def watched(*args, **kwargs):                          # the vision tower, resharded after the prefill
    vision_sharded.append(all(isinstance(p, DTensor) for p in policy.model.model.visual.parameters()))
    return decode(*args, **kwargs)


policy.decode = watched
for name, p in (("sharded", policy), ("plain", plain)):
    count[0] = 0
    r = sample(p, inputs, 4, max_new_tokens=16, eos_token_ids=[-1], pad_token_id=0,
               generators=[torch.Generator().manual_seed(0)])
    result[name] = {"all_gathers": count[0], "tokens": int(r.completion_mask.sum()),
                    "ids": r.completion_ids.tolist(), "logp": r.logp.tolist()}
try:                                                  # decoding needs the gathered parameters
    policy.group_cache(None, inputs["attention_mask"], 4, 16)
except RuntimeError as e:
    result["outside"] = str(e)
with gathered(policy):                                # nested: the inner one does nothing
    sample(policy, inputs, 2, max_new_tokens=2, eos_token_ids=[-1], pad_token_id=0)
    result["still_gathered"] = type(policy.model.lm_head.weight) is torch.nn.Parameter
result["vision_sharded_while_decoding"] = vision_sharded
result["units"] = sum(1 for m in policy.modules() if hasattr(m, "unshard"))
if d.rank == 0:
    print("RESULT " + json.dumps(result))
dist.barrier()
dist.destroy_process_group()
