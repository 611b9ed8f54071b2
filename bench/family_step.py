"""A GRPO step of each model family on models of the same sizes (sbr/tiny.py's builders), side by side.

    python bench/family_step.py                    # the tiny default's sizes, the paper's inputs (~1 min)
    python bench/family_step.py --preset 7b_like   # bench/grpo_step.py's 7B-like balance (minutes)

Each family's model gets the paper's inputs at its own frame size (sbr/family.py): 16 frames and the
observation image, 252 px for Qwen2-VL / Qwen2.5-VL (81 merged tokens a frame pair), 256 px for Qwen3-VL
(64, plus a timestamp a pair), G = 8, `--new_tokens` a completion; one whole GRPO step (sbr's rollout
with the prompt once, the reference's log-probs, the policy's forward + backward, AdamW), the best of
`--repeats`, the families interleaved. All at the same attention width (Qwen3-VL's head_dim = hidden /
heads here, not the tiny default's double); Qwen3-VL's text decoder adds q/k norms and its vision tower
one more block and DeepStack mergers at these sizes (sbr/tiny.py), so the ratio is of models of the same
width, not of the same parameter count. The last line is one JSON object of the figures.
"""
import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_step import PRESETS, best_of, grpo_step  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sbr.collate import VideoCollator, model_inputs  # noqa: E402
from sbr.data import Sample  # noqa: E402
from sbr.family import timestamps  # noqa: E402
from sbr.model import visual_token_ids  # noqa: E402
from sbr.policy import Policy  # noqa: E402
from sbr.positions import install_positions  # noqa: E402
from sbr.tiny import build_model, build_processor, build_tokenizer  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def arm(family: str, sizes: dict, frames: int):
    """(policy, reference, optimizer, inputs) of one family, its inputs at its own frame size."""
    tok = build_tokenizer()
    processor = build_processor(tok, family)
    torch.manual_seed(0)
    hidden = sizes.get("hidden", 64)
    model = build_model(tok, family, **sizes, qwen3_head_dim=hidden // 4)     # 4 heads: the others' attention width
    install_positions(model)                           # as sbr.model.load_model does
    policy = Policy(model, suppress_token_ids=visual_token_ids(tok))
    reference = Policy(copy.deepcopy(model).requires_grad_(False), suppress_token_ids=visual_token_ids(tok)).eval()
    collator = VideoCollator(processor)
    side, g = collator.frame_size, torch.Generator().manual_seed(0)
    item = {"sample": Sample(0, "What next?", ["a", "b", "c", "d"], "A", video="v", image="i"),
            "frames": torch.randint(0, 256, (frames, 3, side, side), dtype=torch.uint8, generator=g),
            "sample_fps": 2.0, "seconds": timestamps(list(range(0, 15 * frames, 15)), 30.0),
            "image": torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=g)}
    inputs = model_inputs(collator([item]))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    return policy, reference, optimizer, inputs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=("tiny", *sorted(PRESETS)), default="tiny")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sizes = {} if args.preset == "tiny" else PRESETS[args.preset]
    arms = {family: arm(family, sizes, args.frames) for family in FAMILIES}
    times = best_of(args.repeats, {family: (lambda a=a: grpo_step(*a[:3], a[3], args.G, args.new_tokens,
                                                                  "prompt once (sbr)")) for family, a in arms.items()})
    figures = {"preset": args.preset, "G": args.G, "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    for family, (policy, _, _, inputs) in arms.items():
        figures[f"{family}_step_s"] = round(times[family][0], 3)
        figures[f"{family}_prompt_tokens"] = int(inputs["input_ids"].shape[1])
        figures[f"{family}_params"] = sum(x.numel() for x in policy.parameters())
        print(f"{family}: step {times[family][0]:.3f} s, prompt {inputs['input_ids'].shape[1]} tokens, "
              f"{figures[f'{family}_params']:,} parameters", flush=True)
    figures["qwen3_over_qwen2_step"] = round(figures["qwen3_vl_step_s"] / figures["qwen2_vl_step_s"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
