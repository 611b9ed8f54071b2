"""Shared-prefix decoding (sbr/decode.py) against Hugging Face's own decoding of G repeated prompts:
the same tokens and log-probs, on a left-padded batch of prompts of different lengths, for Qwen2-VL and
Qwen2.5-VL, eager and compiled."""
import os
import time

import pytest
import torch
from torch._dynamo.utils import counters
from transformers.cache_utils import DynamicCache

from sbr.collate import VideoCollator, model_inputs
from sbr.data import load_seedbench
import emulated_graphs
import sbr.graphs
from sbr.decode import attend, decode_step
from sbr.graphs import StepGraphs, addresses
from sbr.policy import Policy
from sbr.rollout import sample
from test_policy import setup


class RepeatedPolicy(Policy):
    """The reference: each prompt's cache repeated for its G rows and every step a Hugging Face forward
    (its sdpa attention over [prompt padding mask, new tokens]), as decoding worked before."""

    def group_cache(self, prefill_cache, attention_mask, group_size, new_tokens):
        cache = DynamicCache()
        for i, layer in enumerate(prefill_cache.layers):
            cache.update(layer.keys.repeat_interleave(group_size, 0), layer.values.repeat_interleave(group_size, 0), i)
        return {"cache": cache, "mask": attention_mask.repeat_interleave(group_size, 0)}

    def decode(self, token_ids, positions, t, state):
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        out = self.model(input_ids=token_ids[:, None], attention_mask=state["mask"], cache=state["cache"],
                         position_ids=positions.view(1, -1, 1).expand(3, -1, -1), use_cache=True)
        return out.logits[:, -1].float()


def rollouts(tiny, family, policy_class, G=3, tokens=10, **kw):
    processor, model, plain, inputs, eos = setup(tiny, family)
    assert (inputs["attention_mask"] == 0).any()                     # left padding: prompts of different lengths
    policy = policy_class(model, suppress_token_ids=plain.suppress_token_ids, **kw)
    gens = [torch.Generator().manual_seed(i) for i in range(inputs["input_ids"].shape[0])]
    pad = processor.tokenizer.pad_token_id
    sampled = sample(policy, inputs, G, max_new_tokens=tokens, eos_token_ids=eos, pad_token_id=pad,
                     temperature=0.9, generators=gens)
    greedy = sample(policy, inputs, G, max_new_tokens=tokens, eos_token_ids=eos, pad_token_id=pad, greedy=True)
    return sampled, greedy


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_shared_prefix_decoding_equals_repeated_prompts(tiny, family):
    ref_s, ref_g = rollouts(tiny, family, RepeatedPolicy)
    ours_s, ours_g = rollouts(tiny, family, Policy)
    for ours, ref in ((ours_s, ref_s), (ours_g, ref_g)):
        assert torch.equal(ours.completion_ids, ref.completion_ids)
        assert torch.equal(ours.completion_mask, ref.completion_mask)
        assert (ours.logp - ref.logp).abs().max() < 1e-5
    assert len(set(map(tuple, ours_s.completion_ids.tolist()))) > 1    # rows really differ


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_compiled_decoding_gives_the_same_tokens(tiny, family):
    torch._dynamo.reset()
    t0 = time.perf_counter()
    comp_s, comp_g = rollouts(tiny, family, Policy, compile_decode=True)
    print(f"{family}: compiled and ran in {time.perf_counter() - t0:.1f} s")
    eager_s, eager_g = rollouts(tiny, family, Policy)
    for comp, eager in ((comp_s, eager_s), (comp_g, eager_g)):
        assert torch.equal(comp.completion_ids, eager.completion_ids)
        assert (comp.logp - eager.logp).abs().max() < 1e-5
    # another batch of 3 prompts, of other lengths: the same graph (the prompt length is dynamic)
    processor, model, policy, inputs, eos = setup(tiny, family)
    collator = VideoCollator(processor)
    other = model_inputs(collator([collator.load(s) for s in load_seedbench(
        os.path.join(tiny, "data", "annotations", "validation_L1.jsonl"), os.path.join(tiny, "data"))[3:6]]))
    assert other["input_ids"].shape[1] // 64 != inputs["input_ids"].shape[1] // 64     # another 64-bucket
    graphs = counters["stats"]["unique_graphs"]
    policy.compile_decode = True
    again = sample(policy, other, 3, max_new_tokens=10, eos_token_ids=eos, pad_token_id=0, greedy=True)
    policy.compile_decode = False
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(again.completion_ids, sample(policy, other, 3, max_new_tokens=10, eos_token_ids=eos,
                                                    pad_token_id=0, greedy=True).completion_ids)


def test_attention_by_hand():
    """One question, G = 2 rows, r = 1: the combined softmax equals attention over each row's own
    concatenation [prompt, own tokens], prompt padding masked."""
    torch.manual_seed(0)
    d, P, S = 4, 5, 3
    q = torch.randn(1, 1, 2, 1, d)
    pre_k, pre_v = torch.randn(1, 1, P, d), torch.randn(1, 1, P, d)
    own_k, own_v = torch.randn(1, 1, 2, S, d), torch.randn(1, 1, 2, S, d)
    pre_bias = torch.tensor([float("-inf"), 0, 0, 0, 0]).view(1, 1, 1, 1, P)   # one left-pad slot
    out = attend(q, pre_k, pre_v, pre_bias, own_k, own_v, None, 0.5)
    for g in range(2):
        k = torch.cat([pre_k[0, 0, 1:], own_k[0, 0, g]])                     # (P-1+S, d)
        v = torch.cat([pre_v[0, 0, 1:], own_v[0, 0, g]])
        w = torch.softmax(q[0, 0, g, 0] @ k.T * 0.5, dim=0)
        assert torch.allclose(out[0, 0, g, 0], w @ v, atol=1e-6)


def test_the_cache_holds_each_prompt_once(tiny):
    """Eager: the prefill's K/V tensors themselves (B rows, no copy); own K/V a row. Compiled: copied
    once into pooled buffers left-padded to a multiple of 64, reused by the next rollout."""
    processor, model, policy, inputs, eos = setup(tiny, "qwen2_vl")
    B, P = inputs["input_ids"].shape
    with torch.no_grad():
        _, prefill, _, _ = policy.prefill(inputs)
    cache = policy.group_cache(prefill, inputs["attention_mask"], 4, 10)
    assert cache.pre_k[0].data_ptr() == prefill.layers[0].keys.data_ptr() and cache.pre_k[0].shape[0] == B
    assert cache.own_k[0].shape[:4] == (B, 2, 4, 10)                 # (B, H_kv, G, T)
    policy.compile_decode = True
    pooled = policy.group_cache(prefill, inputs["attention_mask"], 4, 10)
    pad = -P % 64
    assert pooled.pre_k[0].shape[2] == P + pad and pad > 0 and pooled.pre_bias[..., :pad].eq(float("-inf")).all()
    again = policy.group_cache(prefill, inputs["attention_mask"], 4, 10)
    assert again.pre_k[0].data_ptr() == pooled.pre_k[0].data_ptr() and again.own_v[1].data_ptr() == pooled.own_v[1].data_ptr()


def test_cuda_graphs_are_recorded_once_a_bucket_and_again_when_the_weights_move(tiny, monkeypatch):
    """CUDA graphs emulated (tests/emulated_graphs.py: a replay fails if it would read an address other
    than its recording's). Prompt-length buckets A -> B -> A: two recordings, the pooled buffers at the
    same addresses (A the longer: a buffer grows to the longest bucket so far), A's recording replayed. Then the weights move, as FSDP2's all-gather moves them
    after every training step: the next rollout frees both recordings and records once. The tokens are
    always the eager step's."""
    monkeypatch.setattr(sbr.graphs, "capture", emulated_graphs.capture)
    emulated_graphs.recorded.clear()
    processor, model, eager, inputs_a, eos = setup(tiny, "qwen2_vl")
    collator = VideoCollator(processor)
    inputs_b = model_inputs(collator([collator.load(s) for s in load_seedbench(
        os.path.join(tiny, "data", "annotations", "validation_L1.jsonl"), os.path.join(tiny, "data"))[3:6]]))
    if inputs_a["input_ids"].shape[1] < inputs_b["input_ids"].shape[1]:
        inputs_a, inputs_b = inputs_b, inputs_a
    assert inputs_a["input_ids"].shape[1] // 64 != inputs_b["input_ids"].shape[1] // 64
    policy = Policy(model, suppress_token_ids=eager.suppress_token_ids, compile_decode=True)
    policy._step = StepGraphs(decode_step)            # the eager static step: the emulation sees its every read

    def both(inputs):
        kw = dict(max_new_tokens=8, eos_token_ids=eos, pad_token_id=0, greedy=True)
        ours = sample(policy, inputs, 2, **kw).completion_ids
        assert torch.equal(ours, sample(eager, inputs, 2, **kw).completion_ids)
        return policy._decode_pool[("k", 0)].data_ptr()

    where = [both(inputs_a), both(inputs_b), both(inputs_a)]
    assert len(set(where)) == 1 and policy.decode_recordings == 2
    # every storage the step reads from outside itself is one sbr.graphs.addresses watches, or an input
    (_, inputs, _), = [e for e in policy._step.live.values() if e[0] is emulated_graphs.recorded[0]]
    watched = {x.untyped_storage().data_ptr() for x in [*addresses(*policy._step._args), *inputs] if x is not None}
    assert emulated_graphs.recorded[0].outside <= watched
    first, second = emulated_graphs.recorded
    assert first.replays == 2 * 7 and second.replays == 7 and not first.freed   # A replayed in its second rollout
    for p in model.parameters():                      # new storage, as FSDP2's reshard + all-gather gives
        p.data = p.data.clone()
    both(inputs_a)
    assert policy.decode_recordings == 3 and first.freed and second.freed and len(policy._step.live) == 1
