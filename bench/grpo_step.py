"""GRPO step cost with the group's prompt computed once (sbr) vs once per completion (TRL and peers).

    python bench/grpo_step.py                      # 7B-like balance, the paper's inputs (~6 min on a CPU)
    python bench/grpo_step.py --compile_decode true   # sbr's rollouts with the compiled decoding step
    python bench/grpo_step.py --preset tiny        # the tiny test model, seconds

A Qwen2-VL built from config with a 7B-like balance (LLM hidden 512 x 8 layers, vision width 128 x 4:
the LLM much larger than the vision tower), the paper's inputs (16 frames at 252x252 + the
observation image, G = 8, ~200-token completions). Side by side in this process, on the same inputs:
  (a) rollout: every prompt repeated G times, decoded by Hugging Face `generate()` (what TRL does)
      and by sbr's own loop (the same algorithm as sbr's but for the repeated prefill), vs prefilled
      once and decoded with its K/V read once for the group (sbr/rollout.py, sbr/decode.py); and the
      decoding step's time against its floor: the bytes a step must read (the LLM's weights once, each
      prompt's K/V once, the rows' own K/V) over this machine's streaming-read bandwidth, measured here
  (b) policy forward + backward over the G completions: prompt (and pixels) repeated per completion
      vs the prompt once with its cache in the autograd graph (sbr/policy.py)
  (c) a whole GRPO step: rollout, reference log-probs, policy forward + backward, AdamW; also with the
      prompt repeated but each question's video and image encoded once (sbr's earlier middle ground)
Prints each time and ratio, the largest log-prob and gradient differences, peak memory, the machine;
the last line is one JSON object of the figures. Times are the best of `--repeats` runs, interleaved.
"""
import argparse
import copy
import json
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bandwidth import read_bandwidth  # noqa: E402
from sbr.collate import VideoCollator, model_inputs  # noqa: E402
from sbr.data import Sample  # noqa: E402
from sbr.grpo import group_advantages, grpo_loss  # noqa: E402
from sbr.memory import decode_step_bytes, model_sizes  # noqa: E402
from sbr.model import visual_token_ids  # noqa: E402
from sbr.policy import Policy  # noqa: E402
from sbr.rollout import sample  # noqa: E402
from sbr.positions import install_positions  # noqa: E402
from sbr.tiny import build_model, build_processor, build_tokenizer  # noqa: E402

PRESETS = {"7b_like": dict(hidden=512, layers=8, vision_width=128, vision_depth=4),
           "tiny": dict(hidden=64, layers=2, vision_width=32, vision_depth=2)}


def repeat_prompts(inputs: dict, G: int) -> dict:
    """The batch with every question repeated G times, pixels included: the peers' rollout input."""
    out = {k: inputs[k].repeat_interleave(G, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for pkey, gkey in (("pixel_values_videos", "video_grid_thw"), ("pixel_values", "image_grid_thw")):
        if gkey in inputs:
            chunks = torch.split(inputs[pkey], inputs[gkey].prod(-1).tolist())
            out[pkey] = torch.cat([c for c in chunks for _ in range(G)])
            out[gkey] = inputs[gkey].repeat_interleave(G, dim=0)
    if "second_per_grid_ts" in inputs:
        out["second_per_grid_ts"] = inputs["second_per_grid_ts"].repeat_interleave(G)
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(repeats, fns: dict) -> dict:
    """{name: (best time, last output)} running the functions in turn `repeats` times (interleaved, so a
    noisy neighbour slows all of them alike)."""
    out = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, r = timed(fn)
            out[name] = (min(out[name][0], t), r)
    return out


def rollout(policy, inputs, G, new_tokens, shared):
    gens = [torch.Generator().manual_seed(i) for i in range(inputs["input_ids"].shape[0])]
    policy.eval()
    if shared == "generate":                              # TRL's rollout: HF generate on repeated prompts
        with torch.no_grad():
            return policy.model.generate(**repeat_prompts(inputs, G), do_sample=True, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, top_k=0, top_p=1.0, temperature=1.0,
                                         suppress_tokens=policy.suppress_token_ids)
    if shared:
        return sample(policy, inputs, G, max_new_tokens=new_tokens, eos_token_ids=[-1], pad_token_id=0,
                      generators=gens)
    repeated = repeat_prompts(inputs, G)
    gens = [g for g in gens for _ in range(G)]            # the same streams, one row each
    return sample(policy, repeated, 1, max_new_tokens=new_tokens, eos_token_ids=[-1], pad_token_id=0,
                  generators=gens)


def forward_backward(policy, inputs, ids, mask, G, shared):
    policy.train()
    policy.zero_grad(set_to_none=True)
    logp, _ = policy.logprobs(inputs, ids, G, share_prompt=shared, share_vision=shared)
    adv = group_advantages(torch.arange(ids.shape[0], dtype=torch.float) % 2, G)
    loss, _ = grpo_loss(logp, None, None, adv, mask)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    return logp.detach(), grads


VARIANTS = {  # name: (rollout, training forwards' keyword arguments)
    "TRL-like: generate(), prompt + pixels per completion": ("generate", dict(share_prompt=False, share_vision=False)),
    "sbr's loop, prompt + pixels per completion": (False, dict(share_prompt=False, share_vision=False)),
    "sbr's loop, prompt per completion, vision once": (False, dict(share_prompt=False, share_vision=True)),
    "prompt once (sbr)": (True, dict(share_prompt=True)),
}


def grpo_step(policy, reference, optimizer, inputs, G, new_tokens, variant):
    how, kw = VARIANTS[variant]
    r = rollout(policy, inputs, G, new_tokens, how)
    ids = r[:, inputs["input_ids"].shape[1]:] if how == "generate" else r.completion_ids
    mask = torch.ones_like(ids) if how == "generate" else r.completion_mask
    with torch.no_grad():
        ref, _ = reference.logprobs(inputs, ids, G, **kw)
    policy.train()
    logp, _ = policy.logprobs(inputs, ids, G, **kw)
    adv = group_advantages(torch.arange(ids.shape[0], dtype=torch.float) % 2, G)
    loss, _ = grpo_loss(logp, None, ref, adv, mask, beta=0.1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=sorted(PRESETS), default="7b_like")
    p.add_argument("--questions", type=int, default=1)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2, help="timings of (a) and (b) taken this many times, best kept")
    p.add_argument("--step_repeats", type=int, default=1, help="timings of (c) taken this many times, best kept")
    p.add_argument("--compile_decode", choices=("true", "false"), default="false")
    args = p.parse_args()
    torch.manual_seed(0)
    tok = build_tokenizer()
    processor = build_processor(tok)
    model = build_model(tok, **PRESETS[args.preset])
    install_positions(model)                           # as sbr.model.load_model does
    policy = Policy(model, suppress_token_ids=visual_token_ids(tok), compile_decode=args.compile_decode == "true")
    reference = Policy(copy.deepcopy(model).requires_grad_(False), suppress_token_ids=visual_token_ids(tok)).eval()
    g = torch.Generator().manual_seed(0)
    items = [{"sample": Sample(i, f"What next {i}?", ["a", "b", "c", "d"], "A", video="v", image="i"),
              "frames": torch.randint(0, 256, (args.frames, 3, 252, 252), dtype=torch.uint8, generator=g),
              "sample_fps": 2.0, "image": torch.randint(0, 256, (3, 252, 252), dtype=torch.uint8, generator=g)}
             for i in range(args.questions)]
    inputs = model_inputs(VideoCollator(processor)(items))
    G, T = args.G, args.new_tokens
    n_llm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"model ({args.preset}): LLM {n_llm / 1e6:.1f}M, vision {n_vis / 1e6:.1f}M params; {args.questions} "
          f"question(s) x G={G}; prompt {inputs['input_ids'].shape[1]} tokens ({args.frames} frames 252x252 + image); "
          f"{T} completion tokens")
    t_compile, _ = timed(lambda: rollout(policy, inputs, G, 4, True))   # warm-up (and compilation)
    if args.compile_decode == "true":
        print(f"compiled decoding step: first rollout {t_compile:.1f} s (compilation included)")

    # (a) rollouts, and the decoding step against its floor
    bandwidth = read_bandwidth()
    runs = best_of(args.repeats, {
        "generate": lambda: rollout(policy, inputs, G, T, "generate"),
        "repeated": lambda: rollout(policy, inputs, G, T, False),
        "shared": lambda: rollout(policy, inputs, G, T, True),
        "prefill": lambda: rollout(policy, inputs, G, 1, True)})
    (t_gen, _), (t_rep, r_rep), (t_shr, r_shr), (t_pre, _) = (runs[k] for k in ("generate", "repeated", "shared", "prefill"))
    same = torch.equal(r_rep.completion_ids, r_shr.completion_ids)
    decode_ms = 1000 * (t_shr - t_pre) / (T - 1)
    nbytes = decode_step_bytes(model_sizes(model.config), questions=args.questions, prompt=inputs["input_ids"].shape[1],
                               G=G, completion=T, dtype_bytes=4)
    floor_ms = 1000 * sum(nbytes.values()) / bandwidth
    print(f"(a) rollout, HF generate() on G repeated prompts (TRL): {t_gen:7.2f} s   {t_gen / t_shr:5.2f}x sbr's time")
    print(f"(a) rollout, sbr's loop on G repeated prompts:          {t_rep:7.2f} s   {t_rep / t_shr:5.2f}x sbr's time"
          f"   (same tokens as sbr: {same})")
    print(f"(a) rollout, sbr (prefill once):                        {t_shr:7.2f} s   "
          f"{G * args.questions * T / t_shr:.0f} tokens/s, decode {100 * (1 - t_pre / t_shr):.0f}% of the time")
    print(f"(a) decoding step: {decode_ms:.2f} ms = {decode_ms / floor_ms:.2f}x its floor of {floor_ms:.2f} ms "
          f"(reads {nbytes['weights'] / 1e6:.1f} MB weights + {nbytes['prompt_kv'] / 1e6:.1f} MB prompt K/V + "
          f"{nbytes['own_kv'] / 1e6:.1f} MB own K/V on average, at {bandwidth / 1e9:.1f} GB/s streaming read); "
          f"the prompt K/V read once per row would be {G * nbytes['prompt_kv'] / 1e6:.1f} MB")

    # (b) policy forward + backward on the same completions, interleaved, the best of --repeats each
    ids, mask = r_shr.completion_ids, r_shr.completion_mask
    runs = best_of(args.repeats, {"repeated": lambda: forward_backward(policy, inputs, ids, mask, G, False),
                                  "shared": lambda: forward_backward(policy, inputs, ids, mask, G, True)})
    (t_rep, (lp_rep, g_rep)), (t_fb, (lp_shr, g_shr)) = runs["repeated"], runs["shared"]
    m = mask.bool()
    logp_diff = max((lp_rep - lp_shr)[m].abs().max().item(), (r_shr.logp - lp_shr)[m].abs().max().item())
    print(f"(b) forward + backward repeated {t_rep:7.2f} s   shared       {t_fb:7.2f} s   {t_rep / t_fb:5.2f}x   "
          f"max |d logp| {(lp_rep - lp_shr)[m].abs().max().item():.1e} (sampling vs training "
          f"{(r_shr.logp - lp_shr)[m].abs().max().item():.1e}), max |d grad| {(g_rep - g_shr).abs().max().item():.1e} "
          f"(largest grad {g_rep.abs().max().item():.1e})")
    fwd_bwd_speedup = t_rep / t_fb

    # (c) whole steps (each changes the weights; the two variants start from the same ones)
    start = copy.deepcopy(model.state_dict())
    times = {}
    for _ in range(args.step_repeats):
        for variant in VARIANTS:
            model.load_state_dict(start)
            optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
            t, _ = timed(lambda: grpo_step(policy, reference, optimizer, inputs, G, T, variant))
            times[variant] = min(times.get(variant, float("inf")), t)
    ours = times["prompt once (sbr)"]
    for variant, t in times.items():
        print(f"(c) GRPO step, {variant:<52} {t:7.2f} s   {t / ours:5.2f}x sbr's time")
    print(f"peak memory (process RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(json.dumps({
        "rollout_speedup_vs_generate": round(t_gen / t_shr, 2),
        "step_speedup_vs_trl_like": round(times["TRL-like: generate(), prompt + pixels per completion"] / ours, 2),
        "fwd_bwd_speedup": round(fwd_bwd_speedup, 2), "decode_ms": round(decode_ms, 2),
        "decode_floor_ms": round(floor_ms, 2), "decode_over_floor": round(decode_ms / floor_ms, 2),
        "read_gb_s": round(bandwidth / 1e9, 1), "max_logp_diff": float(f"{logp_diff:.1e}"), "same_tokens": same,
        "rollout_s": round(t_shr, 2), "generate_s": round(t_gen, 2), "step_s": round(ours, 2),
        "compile_decode": args.compile_decode == "true", "first_rollout_s": round(t_compile, 1),
        "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
