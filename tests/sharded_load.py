"""Run under torchrun (2 ranks, CPU): the sharded loader against the full one, for the tiny model of
argv[2] (default qwen2_vl). Prints RESULT {json} on rank 0 with what matched."""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sbr.collate import VideoCollator, model_inputs
from sbr.common import init_distributed
from sbr.data import load_seedbench
from sbr.fsdp import device_mesh, gathered
from sbr.grpo import grpo_loss
from sbr.model import load_processor, visual_token_ids
from sbr.rollout import sample
from sbr.training import build_policy

tiny, family = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "qwen2_vl"
d = init_distributed(always=True)
path = f"{tiny}/{family}"
processor = load_processor(path)
suppress = visual_token_ids(processor.tokenizer)
collator = VideoCollator(processor)
samples = load_seedbench(f"{tiny}/data/annotations/validation_L1.jsonl", f"{tiny}/data")
inputs = model_inputs(collator([collator.load(samples[1 + d.rank])]))          # a question with a video
eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
result = {"family": family}


def full(module):
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in module.named_parameters()}


def build(load, trainable, mesh=None, bf16=False):
    return build_policy(path, device=d.device, bf16=bf16, suppress=suppress, chunk=7, trainable=trainable,
                        activation_checkpointing=trainable, mesh=mesh, load=load)


# ---- parameters and buffers, FSDP2 and HSDP (2 replicas x 1 shard)
for mesh_name, size in (("fsdp", 0), ("hsdp", 1)):
    a, b = build("full", True, device_mesh(size, "cpu")), build("sharded", True, device_mesh(size, "cpu"))
    fa, fb = full(a), full(b)
    result[f"{mesh_name}_params_equal"] = fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    result[f"{mesh_name}_buffers_equal"] = all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers()))

# ---- one GRPO step from each loader: rollout, reference, loss, backward, AdamW
steps = {}
for load in ("full", "sharded"):
    torch.manual_seed(0)
    policy, reference = build(load, True), build(load, False)
    policy.eval()
    with gathered(policy):
        r = sample(policy, inputs, 4, max_new_tokens=8, eos_token_ids=eos, pad_token_id=0,
                   generators=[torch.Generator().manual_seed(d.rank)])
    with torch.no_grad():
        ref = reference.logprobs(inputs, r.completion_ids, 4)[0]
    reference.reshard()
    policy.train()
    logp, _ = policy.logprobs(inputs, r.completion_ids, 4)
    loss, _ = grpo_loss(logp, None, ref, torch.tensor([1.0, -1.0, 0.5, -0.5]), r.completion_mask, beta=0.1)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0).full_tensor()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    opt.step()
    steps[load] = (r.completion_ids, loss.detach(), norm, full(policy))
    result["reference_resharded"] = all(isinstance(p, DTensor) for p in reference.parameters())
(ia, la, na, pa), (ib, lb, nb, pb) = steps["full"], steps["sharded"]
result["step_equal"] = (torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(na, nb)
                        and all(torch.equal(pa[k], pb[k]) for k in pa))

# ---- a frozen bf16 reference: bf16 parameters, the same log-probs as the policy's bf16 compute
policy, reference = build("sharded", True, bf16=True), build("sharded", False, bf16=True)
result["reference_dtype"] = str(next(reference.parameters()).dtype)
result["policy_dtype"] = str(next(policy.parameters()).dtype)
ids = torch.randint(3, 300, (4, 6), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    result["bf16_reference_equals_policy"] = torch.equal(reference.logprobs(inputs, ids, 4)[0],
                                                         policy.logprobs(inputs, ids, 4)[0])
everyone = [None] * d.world_size
dist.all_gather_object(everyone, result)
if d.rank == 0:
    print("RESULT " + json.dumps(everyone))
dist.barrier()
dist.destroy_process_group()
