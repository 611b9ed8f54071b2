"""The first thing to run on a new GPU cluster: does sbr's GRPO run here, how fast, in how much memory.

    torchrun --nproc_per_node 8 bench/gpu_check.py                 # every GPU of a node, eager and compiled decoding
    torchrun --nproc_per_node 1 bench/gpu_check.py --presets tiny  # seconds
    python bench/gpu_check.py --presets tiny --new_tokens 16       # also runs on a CPU (gloo, fp32): a smoke test

For each preset, the real path of train_grpo.py: torchrun, NCCL, FSDP2 with bf16 mixed precision,
flash-attention-2 when importable (else SDPA), sharded loading, the paper's G = 8 with one question a
GPU and 16 frames of 252x252 (Qwen3-VL: 256x256) + the observation image:
  tiny   the built-in tiny Qwen2-VL (0.2M parameters)
  tiny_qwen3  the built-in tiny Qwen3-VL (0.3M: q/k norms, DeepStack, timestamps, 256-px frames)
  0.5b   a Qwen2-VL built from config with Qwen2-0.5B's language model (hidden 896, 24 layers, vocab
         151,936) and a 4-block vision tower, ~0.55B parameters, saved as bf16 safetensors
It reports per preset, with eager decoding and with the compiled decoding step (`--compile_decode`:
CUDA graphs), the GRPO step time, rollout tokens/s, rollout ms per new token against the decoding
step's floor (the bytes it must read, sbr.memory.decode_step_bytes, over this GPU's read bandwidth
measured here), training tokens/s and peak memory beside the memory plan's peak (sbr/memory.py), the CUDA graphs each
compiled rollout recorded (sbr/graphs.py; 1 a step under FSDP2, which moves the weights); then
checks that the shared-prompt log-probs equal the repeated computation's within bf16 tolerance on a
left-padded batch (two prompts of different lengths: flash-attention-2's padded path with a cache
longer than the query), and how many greedy tokens compiled decoding shares with eager decoding;
then `--offload optimizer`'s AdamW (sbr/offload.py) against torch's on 64M parameters: the same
numbers, no state left on the GPU, and the step's time (host <-> device GB/s).
The random models seldom stop early, so completions run to --new_tokens: the timings are of full
length rollouts. The last line is one JSON object of the figures.
"""
import argparse
import json
import os
import sys
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_grpo  # noqa: E402
from bandwidth import read_bandwidth  # noqa: E402
from sbr.common import attn_implementation, init_distributed  # noqa: E402
from sbr.memory import decode_step_bytes, model_sizes  # noqa: E402
from sbr.tiny import ensure_tiny  # noqa: E402


def build_05b(folder: str, tiny: str) -> str:
    """A ~0.55B Qwen2-VL from config (random weights), with the tiny default's processor."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    processor = AutoProcessor.from_pretrained(os.path.join(tiny, "qwen2_vl"))
    tok = processor.tokenizer
    text = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 8, 8]},
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    vision = dict(depth=4, embed_dim=640, hidden_size=896, num_heads=10, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
           ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                                          **ids)).to(torch.bfloat16)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def logprob_check(model_dir: str, data_root: str, device, bf16: bool) -> dict:
    """Shared-prompt vs repeated log-probs on two left-padded prompts, in the compute dtype."""
    from sbr.collate import VideoCollator, model_inputs
    from sbr.data import load_seedbench
    from sbr.model import load_model, load_processor, visual_token_ids
    from sbr.policy import Policy
    from sbr.rollout import sample
    dtype = torch.bfloat16 if bf16 else torch.float32
    processor = load_processor(model_dir)
    policy = Policy(load_model(model_dir, dtype=dtype, device=device), suppress_token_ids=visual_token_ids(processor.tokenizer))
    samples = load_seedbench(os.path.join(data_root, "annotations", "validation_L1.jsonl"), data_root)
    collator = VideoCollator(processor)
    inputs = model_inputs(collator([collator.load(s) for s in (samples[0], samples[5])]), device, dtype)   # no video / video
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        r = sample(policy, inputs, 4, max_new_tokens=32, eos_token_ids=[-1], pad_token_id=pad,
                   generators=[torch.Generator(device=device).manual_seed(i) for i in range(2)])
        shared = policy.logprobs(inputs, r.completion_ids, 4)[0]
        repeated = policy.logprobs(inputs, r.completion_ids, 4, share_prompt=False)[0]
        eager = sample(policy, inputs, 4, max_new_tokens=32, eos_token_ids=[-1], pad_token_id=pad, greedy=True)
        policy.compile_decode = True
        compiled = sample(policy, inputs, 4, max_new_tokens=32, eos_token_ids=[-1], pad_token_id=pad, greedy=True)
    diff = (shared - repeated).abs()[r.completion_mask.bool()].float()
    tolerance = 0.1 if bf16 else 1e-4
    # greedy rows agree until the first near-tie that bf16 rounding turns: the shared prefix of each row
    agree = (eager.completion_ids == compiled.completion_ids).long().cumprod(1).sum().item() / eager.completion_ids.numel()
    return {"logprob_max_abs_diff": diff.max().item(), "logprob_mean_abs_diff": diff.mean().item(),
            "logprob_tolerance": tolerance, "logprob_ok": diff.max().item() <= tolerance,
            "compiled_greedy_agreement": agree, "attn_implementation": policy.model.config._attn_implementation}


def offload_check(device, numel: int = 1 << 26) -> dict:
    """--offload optimizer (sbr/offload.py) against torch's AdamW on `numel` parameters of this device:
    the largest difference after 3 steps, the AdamW state left on the device, each step's time."""
    import time
    from sbr.offload import HostAdamW, state_bytes
    torch.manual_seed(0)
    start = [torch.randn(numel // 4, device=device) for _ in range(4)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    runs = {}
    for name, kind in (("adamw", torch.optim.AdamW), ("host", HostAdamW)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = kind(params, lr=1e-3, weight_decay=0.1)
        times = []
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi
            t = time.perf_counter()
            opt.step()
            torch.cuda.synchronize() if device.type == "cuda" else None
            times.append(time.perf_counter() - t)
        runs[name] = params, state_bytes(opt), min(times)
    diff = max((a - b).abs().max().item() for a, b in zip(runs["adamw"][0], runs["host"][0]))
    return {"numel": numel, "offload_max_abs_diff": diff, "offload_state_on_device_bytes": runs["host"][1].get(device.type, 0)
            if device.type != "cpu" else None, "adamw_step_s": runs["adamw"][2], "host_adamw_step_s": runs["host"][2],
            "host_adamw_gb_s": 16 * numel / runs["host"][2] / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="*", default=["tiny", "tiny_qwen3", "0.5b"])
    p.add_argument("--steps", type=int, default=3, help="GRPO steps a preset; the first (warm-up) is left out")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--compile_decode", choices=("both", "true", "false"), default="both")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"))
    args = p.parse_args()
    d = init_distributed(always=True)
    tiny = ensure_tiny(os.path.join(args.out, "tiny")) if d.rank == 0 else os.path.join(args.out, "tiny")
    torch.distributed.barrier()
    models = {"tiny": os.path.join(tiny, "qwen2_vl"), "tiny_qwen3": os.path.join(tiny, "qwen3_vl")}
    if "0.5b" in args.presets:
        if d.rank == 0:
            build_05b(os.path.join(args.out, "qwen2_vl_0.5b"), tiny)
        torch.distributed.barrier()
        models["0.5b"] = os.path.join(args.out, "qwen2_vl_0.5b")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    bandwidth = read_bandwidth(d.device)
    figures = {"device": gpu, "world_size": d.world_size, "attn": attn_implementation(),
               "torch": torch.__version__, "read_gb_s": bandwidth / 1e9, "presets": {}}
    compiles = {"both": (False, True), "true": (True,), "false": (False,)}[args.compile_decode]
    for preset, compile_decode in [(p, c) for p in args.presets for c in compiles]:
        name = preset + ("+compiled" if compile_decode else "")
        cfg = replace(train_grpo.Config(), model=models[preset], data_root=os.path.join(tiny, "data"),
                      out_dir=os.path.join(args.out, f"run_{name}"), max_steps=args.steps,
                      max_completion_length=args.new_tokens, save_every=10**6, export=False, overwrite=True,
                      num_workers=2, rollout_log_every=10**6, compile_decode=compile_decode)
        history = train_grpo.main(cfg)                   # joins this process group and leaves it standing
        timed = history[1:] or history
        mean = lambda k: sum(h[k] for h in timed) / len(timed)   # noqa: E731
        plan = train_grpo.memory_plan(cfg, d.world_size)
        plan_peak = float(plan.split("peak: ")[1].split(" GiB")[0])
        from transformers import AutoConfig
        nbytes = decode_step_bytes(model_sizes(AutoConfig.from_pretrained(models[preset])), questions=cfg.questions_per_rank,
                                   prompt=round(mean("prompt_length")), G=cfg.num_generations, completion=args.new_tokens,
                                   dtype_bytes=2 if d.device.type == "cuda" else 4)
        row = {"step_s": mean("step_time"), "rollout_tokens_per_s": mean("rollout_tokens_per_s"),
               "decode_ms_per_token": mean("decode_ms_per_token"), "train_tokens_per_s": mean("train_tokens_per_s"),
               "decode_floor_ms": 1000 * sum(nbytes.values()) / bandwidth,
               "completion_length": mean("completion_length"), "peak_memory_gib": max(h["peak_memory_mb"] for h in history) / 1024,
               "plan_peak_gib": plan_peak, "decode_recordings": [h["decode_recordings"] for h in history]}
        if not compile_decode:       # on every rank (each its own GPU), so none waits in a collective meanwhile
            row.update(logprob_check(models[preset], os.path.join(tiny, "data"), d.device, d.device.type == "cuda"))
        if d.rank == 0 and not compile_decode:
            print(f"[{name}] shared vs repeated log-probs max |d| {row['logprob_max_abs_diff']:.2e} "
                  f"({'ok' if row['logprob_ok'] else 'FAILED'}, {row['attn_implementation']}); compiled greedy "
                  f"decoding agrees with eager on {100 * row['compiled_greedy_agreement']:.1f}% of tokens", flush=True)
        if d.rank == 0:
            print(f"[{name}] step {row['step_s']:.2f} s, rollout {row['rollout_tokens_per_s']:.0f} tokens/s "
                  f"({row['decode_ms_per_token']:.2f} ms a new token, prefill included; the decoding step's floor "
                  f"{row['decode_floor_ms']:.2f} ms at {bandwidth / 1e9:.0f} GB/s), training "
                  f"{row['train_tokens_per_s']:.0f} tokens/s, peak {row['peak_memory_gib']:.2f} GiB (plan {plan_peak:.2f})",
                  flush=True)
        figures["presets"][name] = row
    figures["offload_optimizer"] = offload_check(d.device, 1 << 26 if d.device.type == "cuda" else 1 << 16)
    if d.rank == 0:
        o = figures["offload_optimizer"]
        print(f"[--offload optimizer] {o['host_adamw_step_s']:.3f} s a step of {o['numel']:,} parameters against AdamW's "
              f"{o['adamw_step_s']:.3f} s ({o['host_adamw_gb_s']:.1f} GB/s host <-> device), max |d| "
              f"{o['offload_max_abs_diff']:.1e}", flush=True)
        print(json.dumps(figures))
    torch.distributed.destroy_process_group()           # the one process group of the whole check


if __name__ == "__main__":
    main()
