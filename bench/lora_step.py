"""A GRPO step with LoRA against full fine-tuning, on bench/grpo_step.py's 7B-like model and inputs.

    python bench/lora_step.py                      # 7B-like balance, the paper's inputs (~4 min on a CPU)
    python bench/lora_step.py --preset tiny        # seconds

Side by side in this process, on the same inputs, one whole GRPO step each (sbr's rollout with the
prompt once, the reference's log-probs, the policy's forward + backward, AdamW):
  full: the policy trained whole, a frozen copy of it as the reference (what `train_grpo.py` does
        without --lora_rank)
  lora: the same model frozen with adapters of rank r on the seven projections of every decoder layer
        (sbr/lora.py), the reference = the adapters switched off (no copy), AdamW over the adapters
Times are the best of `--repeats` steps, interleaved. Memory: each arm runs its step once more in a
child process of its own: its peak RSS over the RSS before its model was built, and what the step
keeps, counted tensor by tensor (parameters, gradients, AdamW state, the reference). Both arms are fp32
here (a CPU); on a GPU LoRA's frozen base is bf16 as well, halving its parameters again.
r = 8 at this width gives the adapters the share of a decoder layer that r = 64 has at 7B:
8 x 8,192 / 2.36M = 2.8% here, 64 x 90,112 / 233M = 2.5% for Qwen2-VL-7B.
The last line is one JSON object of the figures.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_step import PRESETS, best_of, grpo_step  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sbr import lora  # noqa: E402
from sbr.collate import VideoCollator, model_inputs  # noqa: E402
from sbr.data import Sample  # noqa: E402
from sbr.model import visual_token_ids  # noqa: E402
from sbr.policy import Policy  # noqa: E402
from sbr.positions import install_positions  # noqa: E402
from sbr.tiny import build_model, build_processor, build_tokenizer  # noqa: E402

STEP = "prompt once (sbr)"          # grpo_step.py's variant: sbr's own step


def inputs_for(args, processor):
    g = torch.Generator().manual_seed(0)
    items = [{"sample": Sample(i, f"What next {i}?", ["a", "b", "c", "d"], "A", video="v", image="i"),
              "frames": torch.randint(0, 256, (args.frames, 3, 252, 252), dtype=torch.uint8, generator=g),
              "sample_fps": 2.0, "image": torch.randint(0, 256, (3, 252, 252), dtype=torch.uint8, generator=g)}
             for i in range(args.questions)]
    return model_inputs(VideoCollator(processor)(items))


def build(arm: str, tok, args):
    """(policy, reference, optimizer) of one arm, from the same random model."""
    torch.manual_seed(0)
    model = build_model(tok, **PRESETS[args.preset])
    install_positions(model)
    policy = Policy(model, suppress_token_ids=visual_token_ids(tok))
    if arm == "lora":
        lora.add(model, args.lora_rank, 2 * args.lora_rank, seed=0)
        reference = lora.Base(policy)
    else:
        reference = Policy(copy.deepcopy(model).requires_grad_(False), suppress_token_ids=visual_token_ids(tok)).eval()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    return policy, reference, optimizer


def kept_bytes(policy, reference, optimizer) -> dict:
    """What the step keeps, by kind, in bytes (gradients as the step leaves them before zero_grad: the
    trainable parameters' size)."""
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)       # noqa: E731
    trainable = [p for p in policy.parameters() if p.requires_grad]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    separate = reference.parameters() if isinstance(reference, Policy) else []
    return {"parameters": size(policy.parameters()), "gradients": size(trainable), "adamw": size(state),
            "reference": size(separate), "trainable_parameters": sum(p.numel() for p in trainable)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    """One arm's step in this fresh process: its peak RSS over the RSS before the model."""
    tok = build_tokenizer()
    inputs = inputs_for(args, build_processor(tok))
    before = rss_bytes()
    policy, reference, optimizer = build(args.arm, tok, args)
    grpo_step(policy, reference, optimizer, inputs, args.G, args.new_tokens, STEP)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"peak_bytes": peak, **kept_bytes(policy, reference, optimizer)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=sorted(PRESETS), default="7b_like")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--questions", type=int, default=1)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2, help="steps timed per arm, the best kept")
    p.add_argument("--arm", choices=("full", "lora"), help=argparse.SUPPRESS)      # the memory children
    args = p.parse_args()
    if args.arm:
        return child(args)
    tok = build_tokenizer()
    inputs = inputs_for(args, build_processor(tok))
    arms = {arm: build(arm, tok, args) for arm in ("full", "lora")}
    print(f"model ({args.preset}): {sum(q.numel() for q in arms['full'][0].parameters()) / 1e6:.1f}M parameters; "
          f"LoRA r={args.lora_rank}: {kept_bytes(*arms['lora'])['trainable_parameters'] / 1e6:.2f}M trainable; "
          f"{args.questions} question(s) x G={args.G}, prompt {inputs['input_ids'].shape[1]} tokens, "
          f"{args.new_tokens} new tokens; threads {torch.get_num_threads()}")
    runs = best_of(args.repeats, {arm: (lambda a=a: grpo_step(*a, inputs, args.G, args.new_tokens, STEP))
                                  for arm, a in arms.items()})
    memory = {}
    for arm in arms:
        cmd = [sys.executable, os.path.abspath(__file__), "--arm", arm] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("arm", "repeats")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[arm] = json.loads(out.strip().splitlines()[-1])
    for arm in arms:
        m = memory[arm]
        print(f"{arm:4s}: step {runs[arm][0]:6.2f} s; peak RSS +{m['peak_bytes'] / 2**20:7.1f} MiB; kept: parameters "
              f"{m['parameters'] / 2**20:.1f} MiB, gradients {m['gradients'] / 2**20:.1f}, AdamW {m['adamw'] / 2**20:.1f}, "
              f"reference {m['reference'] / 2**20:.1f}")
    full, low = memory["full"], memory["lora"]
    kept = lambda m: m["parameters"] + m["gradients"] + m["adamw"] + m["reference"]     # noqa: E731
    print(json.dumps({
        "preset": args.preset, "lora_rank": args.lora_rank, "trainable_fraction": round(
            low["trainable_parameters"] / full["trainable_parameters"], 4),
        "full_step_s": round(runs["full"][0], 2), "lora_step_s": round(runs["lora"][0], 2),
        "step_time_ratio_lora_over_full": round(runs["lora"][0] / runs["full"][0], 3),
        "full_peak_mib": round(full["peak_bytes"] / 2**20, 1), "lora_peak_mib": round(low["peak_bytes"] / 2**20, 1),
        "peak_ratio_lora_over_full": round(low["peak_bytes"] / full["peak_bytes"], 3),
        "kept_ratio_lora_over_full": round(kept(low) / kept(full), 3), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
