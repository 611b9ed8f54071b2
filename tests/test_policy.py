"""Rollouts and log-probs on the tiny models: exactness against Hugging Face and against the
repeated (per-completion) computation."""
import os

import pytest
import torch

from sbr.collate import VideoCollator, model_inputs
from sbr.data import load_seedbench
from sbr.model import load_model, load_processor, visual_token_ids
from sbr.policy import Policy
from sbr.rollout import filter_logits, sample


def setup(tiny, family, n=3, chunk=7):
    processor = load_processor(os.path.join(tiny, family))
    model = load_model(os.path.join(tiny, family))
    policy = Policy(model, suppress_token_ids=visual_token_ids(processor.tokenizer), chunk_size=chunk)
    root = os.path.join(tiny, "data")
    samples = load_seedbench(os.path.join(root, "annotations", "validation_L1.jsonl"), root)
    collator = VideoCollator(processor)
    # sample 0 has no progress video, 1 and 2 do: a mixed, left-padded batch
    inputs = model_inputs(collator([collator.load(s) for s in samples[:n]]))
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return processor, model, policy, inputs, eos


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_greedy_rollout_equals_generate(tiny, family):
    processor, model, policy, inputs, eos = setup(tiny, family)
    ours = sample(policy, inputs, 1, max_new_tokens=12, eos_token_ids=eos,
                  pad_token_id=processor.tokenizer.pad_token_id, greedy=True)
    ref = model.generate(**inputs, max_new_tokens=12, do_sample=False, suppress_tokens=policy.suppress_token_ids)
    ref = ref[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(ours.completion_ids, ref[:, :ours.completion_ids.shape[1]])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_generation_and_training_logprobs_agree_and_sharing_is_exact(tiny, family):
    processor, model, policy, inputs, eos = setup(tiny, family)
    if family == "qwen2_5_vl":
        assert "second_per_grid_ts" in inputs                 # temporal positions are exercised
    G = 4
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    r = sample(policy, inputs, G, max_new_tokens=16, eos_token_ids=eos, temperature=0.7,
               pad_token_id=processor.tokenizer.pad_token_id, generators=gens)
    m = r.completion_mask.bool()
    variants = {"shared prompt": dict(), "repeated, vision shared": dict(share_prompt=False),
                "repeated pixels": dict(share_prompt=False, share_vision=False)}
    logps, grads = {}, {}
    for name, kw in variants.items():
        model.zero_grad()
        logp, entropy = policy.logprobs(inputs, r.completion_ids, G, temperature=0.7, **kw)
        logp[m].sum().backward()
        logps[name] = logp.detach()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert (entropy[m] > 0).all()
    assert (logps["shared prompt"] - r.logp)[m].abs().max() < 1e-5          # sampling-time == training-time
    base = grads["repeated pixels"]
    assert base[: model.model.visual.patch_embed.proj.weight.numel()].abs().sum() > 0   # vision gets gradient
    for name in ("shared prompt", "repeated, vision shared"):
        assert (logps[name] - logps["repeated pixels"])[m].abs().max() < 1e-6, name
        assert torch.allclose(grads[name], base, rtol=1e-4, atol=2e-5), name
    # activation checkpointing replays the prompt pass: the replay-safe caches give the same gradients
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad()
    policy.logprobs(inputs, r.completion_ids, G, temperature=0.7)[0][m].sum().backward()
    checkpointed = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(checkpointed, grads["shared prompt"], rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_logprobs(tiny):
    processor, model, policy, inputs, eos = setup(tiny, "qwen2_vl", n=2)
    r = sample(policy, inputs, 2, max_new_tokens=10, eos_token_ids=eos,
               pad_token_id=processor.tokenizer.pad_token_id, generators=[torch.Generator().manual_seed(0)] * 2)
    small, _ = policy.logprobs(inputs, r.completion_ids, 2)
    policy.chunk_size = 10_000
    whole, _ = policy.logprobs(inputs, r.completion_ids, 2)
    assert torch.allclose(small, whole, atol=1e-6)


def test_completion_mask_stops_at_end_of_turn_and_truncation(tiny):
    processor, model, policy, inputs, eos = setup(tiny, "qwen2_vl", n=2)
    # a zeroed head samples uniformly: end-of-turn comes at ~1/500 a token, so over 600 tokens
    # some rows stop and some run out
    with torch.no_grad():
        model.lm_head.weight.zero_()
    pad = processor.tokenizer.pad_token_id
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    r = sample(policy, inputs, 4, max_new_tokens=600, eos_token_ids=eos, pad_token_id=pad, generators=gens)
    for ids, mask, trunc in zip(r.completion_ids, r.completion_mask, r.truncated):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()                 # a prefix
        if not trunc:
            assert ids[n - 1] == eos[0] and (ids[:n - 1] != eos[0]).all() and (ids[n:] == pad).all()
    assert not r.truncated.all()
    short = sample(policy, inputs, 4, max_new_tokens=3, eos_token_ids=eos, pad_token_id=pad, generators=gens,
                   mask_truncated=True)
    assert torch.equal(short.completion_mask.sum(1) == 0, short.truncated)


def test_filter_logits():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(z, top_k=2)[0, 2:]).all() and torch.isfinite(filter_logits(z, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(z, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]                        # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert torch.isfinite(filter_logits(z, top_p=0.4))[0].tolist() == [True, False, False, False]


def test_a_batch_without_media_still_runs_the_vision_tower(tiny):
    """Under FSDP2 every rank must make the same collective calls: no media -> a dummy tower call tied
    into the graph with weight 0, so backward reaches the tower's parameters too."""
    processor, model, policy, inputs, eos = setup(tiny, "qwen2_vl", n=1)
    text_only = {k: v for k, v in inputs.items() if k not in
                 ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    encoded, zero = policy.visual_features(text_only)
    hook.remove()
    assert encoded == {} and calls == [1] and zero.item() == 0.0
    zero.backward()
    assert all(p.grad is not None for p in model.model.visual.parameters())


class ScriptedPolicy:
    """Emits a fixed token per row and step (no model): for the rollout's stopping and masking rules."""
    suppress_token_ids = []

    def __init__(self, script):
        self.script, self.t = script, 0

    def prefill(self, inputs):
        from transformers.cache_utils import Cache
        self.t = 0
        B = inputs["input_ids"].shape[0]
        return self._logits(), Cache(layers=[]), inputs["attention_mask"].sum(1), torch.zeros(B, 1, dtype=torch.long)

    def group_cache(self, prefill_cache, attention_mask, group_size, new_tokens):
        return None

    def decode(self, ids, positions, t, cache):
        return self._logits()

    def _logits(self):
        z = torch.full((self.script.shape[0], 10), -1e4)
        z[torch.arange(self.script.shape[0]), self.script[:, self.t]] = 0
        self.t += 1
        return z


def test_a_completion_stops_at_either_stop_token_and_lengths_stay_real():
    """Stop ids 9 (<|im_end|>) and 8 (<|endoftext|>), as the authors' rollouts stopped: row 0 ends at 9,
    row 1 at 8, each mask through its stop token; row 2 never stops: truncated, masked out entirely by
    mask_truncated, but its length (6 generated tokens) is still reported."""
    script = torch.tensor([[3, 4, 9, 5, 5, 5], [3, 8, 5, 5, 5, 5], [3, 3, 3, 3, 3, 3]])
    inputs = {"input_ids": torch.zeros(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2, dtype=torch.long)}
    r = sample(ScriptedPolicy(script), inputs, 1, max_new_tokens=6, eos_token_ids=[9, 8], pad_token_id=0,
               greedy=True, mask_truncated=True)
    assert r.completion_ids.tolist() == [[3, 4, 9, 0, 0, 0], [3, 8, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3]]
    assert r.completion_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert r.truncated.tolist() == [False, False, True] and r.lengths.tolist() == [3, 2, 6]


def test_stopping_is_read_back_every_k_tokens_without_changing_the_rollout():
    """Every row stops by token 3 (index 2). Checked every token, decoding ends there (2 decoding steps
    after the prefill); checked every 4 tokens, it runs on to index 3, writing only padding."""
    script = torch.tensor([[3, 4, 9, 5, 5, 5], [3, 8, 5, 5, 5, 5]])
    inputs = {"input_ids": torch.zeros(2, 2, dtype=torch.long), "attention_mask": torch.ones(2, 2, dtype=torch.long)}
    out = {}
    for k in (1, 4):
        policy = ScriptedPolicy(script)
        out[k] = sample(policy, inputs, 1, max_new_tokens=6, eos_token_ids=[9, 8], pad_token_id=0, greedy=True,
                        check_every=k)
        out[k, "steps"] = policy.t - 1                               # decoding calls after the prefill
    assert (out[1, "steps"], out[4, "steps"]) == (2, 3)
    assert out[1].completion_ids.tolist() == out[4].completion_ids.tolist() == [[3, 4, 9], [3, 8, 0]]
    assert torch.equal(out[1].completion_mask, out[4].completion_mask) and torch.equal(out[1].lengths, out[4].lengths)


def test_defaults_sample_as_the_authors_did():
    """Their GenerationConfig set only do_sample, temperature 1 and the length, so transformers' top_k=50
    and top_p=1.0 applied; they stopped at both eos ids and clamped the KL's log-ratio to ±11."""
    import evaluate
    import train_grpo
    cfg = train_grpo.Config()
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.kl_clamp) == (1.0, 50, 1.0, 11.0)
    assert cfg.stop_tokens == ["<|im_end|>", "<|endoftext|>"] == evaluate.Config().stop_tokens
    torch.manual_seed(0)
    z = torch.randn(4, 300)
    kept = torch.isfinite(filter_logits(z, cfg.top_k, cfg.top_p))
    assert (kept.sum(-1) == 50).all() and torch.equal(kept, z >= z.topk(50).values[:, -1:])
