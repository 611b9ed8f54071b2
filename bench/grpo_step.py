"""Wall time of one GRPO step on the tiny Qwen2-VL, vision features shared across the G completions
of a question vs recomputed for each completion (what repeating the pixels, as peers do, costs).

    python bench/grpo_step.py [--questions 2] [--G 8] [--frames 16] [--new_tokens 64] [--repeats 3]

Both variants run in this process on the same inputs: rollout (prefill once, sample G), reference
log-probs, policy log-probs + GRPO loss + backward, AdamW step. Prints each time and the ratio.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sbr.collate import VideoCollator, model_inputs  # noqa: E402
from sbr.data import Sample  # noqa: E402
from sbr.grpo import group_advantages, grpo_loss  # noqa: E402
from sbr.model import visual_token_ids  # noqa: E402
from sbr.policy import Policy  # noqa: E402
from sbr.rollout import sample  # noqa: E402
from sbr.tiny import build_model, build_processor, build_tokenizer  # noqa: E402


def step(policy, reference, optimizer, inputs, G, new_tokens, share, eos, pad):
    gens = [torch.Generator().manual_seed(i) for i in range(inputs["input_ids"].shape[0])]
    policy.eval()
    r = sample(policy, inputs, G, max_new_tokens=new_tokens, eos_token_ids=eos, pad_token_id=pad, generators=gens)
    reward = torch.rand(r.completion_ids.shape[0], generator=torch.Generator().manual_seed(0)).round()
    adv = group_advantages(reward, G)
    with torch.no_grad():
        ref, _ = reference.logprobs(inputs, r.completion_ids, G, share_vision=share)
    policy.train()
    logp, _ = policy.logprobs(inputs, r.completion_ids, G, share_vision=share)
    loss, _ = grpo_loss(logp, None, ref, adv, r.completion_mask, beta=0.1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return int(r.completion_mask.sum())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tok = build_tokenizer()
    processor = build_processor(tok)
    model = build_model(tok)
    policy = Policy(model, suppress_token_ids=visual_token_ids(tok))
    reference = Policy(copy.deepcopy(model).requires_grad_(False), suppress_token_ids=visual_token_ids(tok)).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    items = [{"sample": Sample(i, f"What next {i}?", ["a", "b", "c", "d"], "A", video="v", image="i"),
              "frames": torch.randint(0, 256, (args.frames, 3, 252, 252), dtype=torch.uint8, generator=g),
              "sample_fps": 2.0, "image": torch.randint(0, 256, (3, 252, 252), dtype=torch.uint8, generator=g)}
             for i in range(args.questions)]
    inputs = model_inputs(VideoCollator(processor)(items))
    eos, pad = [tok.convert_tokens_to_ids("<|im_end|>")], tok.pad_token_id
    times = {}
    for share in (False, True, False, True):       # interleaved, after one warm-up each
        step(policy, reference, optimizer, inputs, args.G, args.new_tokens, share, eos, pad)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            step(policy, reference, optimizer, inputs, args.G, args.new_tokens, share, eos, pad)
        times.setdefault(share, []).append((time.perf_counter() - t0) / args.repeats)
    repeated, shared = min(times[False]), min(times[True])
    print(f"tiny Qwen2-VL ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), threads "
          f"{torch.get_num_threads()}, {args.questions} questions x G={args.G}, {args.frames} frames 252x252 + image, "
          f"{args.new_tokens} new tokens")
    print(f"GRPO step, vision repeated per completion: {repeated:.3f} s")
    print(f"GRPO step, vision shared per question:     {shared:.3f} s")
    print(f"ratio repeated / shared: {repeated / shared:.2f}x")


if __name__ == "__main__":
    main()
