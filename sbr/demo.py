"""The tiny default's demonstration: a small Qwen2-VL that GRPO visibly teaches, built on first use.

`python train_grpo.py` with no --model trains `<tiny_dir>/demo/model` on `<tiny_dir>/demo/data`
(`evaluate.py` with no --data_root evaluates on the same data). Both are built here once (~70 s on
2 CPU cores; rank 0 builds, the others wait):
- data: the synthetic SEED-Bench-R1 of sbr/synth.py, 1,200 training questions and 60 a validation
  level: the pictures show how many steps of a four-step procedure are done; the right next action
  is the procedure's next step (L1: the training rooms; L2: new rooms; L3: new rooms and objects);
- model: a random Qwen2-VL (128 hidden, 4 layers) warmed up by 200 steps of next-token loss on
  sbr/synth.py's warmup.jsonl, whose answers report truly how many steps the pictures show done,
  then name a random next step and letter. It learns the format and the perception, not the
  planning rule: it answers at chance (~25%), as the paper's base model needs RL to plan.
GRPO with the accuracy reward then has to find the rule from rewards alone (train_grpo.demo_config).
The same warm-up is launch/repro_cpu.sh's (with train_sft.py there; a plain one-process loop here).
"""
import math
import os
import shutil

import torch

from sbr import synth
from sbr.collate import VideoCollator, model_inputs, responses
from sbr.data import load_sft
from sbr.model import load_model, load_processor, visual_token_ids
from sbr.policy import Policy
from sbr.training import StepSampler, lr_schedule, optimizer_step

VERSION = "1"        # bump when what is built changes, so stale copies are rebuilt
SIZES = dict(hidden=128, layers=4, vision_width=64, vision_depth=2)
TRAIN, VAL, SEED = 1200, 60, 0
WARMUP_STEPS, BATCH, LR = 200, 16, 1e-3


def warm_up(init: str, data_root: str, out: str, *, steps: int = WARMUP_STEPS, batch: int = BATCH,
            lr: float = LR, seed: int = SEED) -> None:
    """`steps` AdamW updates of the mean next-token loss over the response tokens of `batch` warm-up
    records (linear warm-up over 5% of the steps, then linear decay); saved to `out`."""
    torch.manual_seed(seed)
    processor = load_processor(init)
    model = load_model(init, dtype=torch.float32)
    policy = Policy(model, suppress_token_ids=visual_token_ids(processor.tokenizer)).train()
    train = load_sft(os.path.join(data_root, "annotations", "warmup.jsonl"), data_root)
    collator = VideoCollator(processor, padding_side="left", frame_size=synth.SIZE)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule("linear", math.ceil(0.05 * steps), steps))
    for step, batch_ids in enumerate(StepSampler(len(train), steps, 0, 0, 1, batch, seed)):
        items = [collator.load(train[i]) for i in batch_ids]
        inputs = model_inputs(collator(items), "cpu")
        ids, mask, _ = responses(collator, items, inputs["attention_mask"].sum(1).tolist(), 8192, "cpu")
        logp, _ = policy.logprobs(inputs, ids, 1, share_prompt=False)            # (B, R)
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        optimizer_step(policy, optimizer, scheduler, max_grad_norm=1.0)
        if (step + 1) % 50 == 0:
            print(f"  warm-up step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def paths(tiny_dir: str) -> tuple[str, str]:
    """(model folder, data root) of the demonstration under `tiny_dir`, built or not."""
    return os.path.join(tiny_dir, "demo", "model"), os.path.join(tiny_dir, "demo", "data")


def ensure_demo(tiny_dir: str) -> tuple[str, str]:
    """(model folder, data root) of the demonstration, built under `<tiny_dir>/demo` unless a complete
    copy of this version is there; built in a temporary folder and renamed, so a kill leaves none half-made."""
    from sbr.tiny import build_model_dir
    root = os.path.join(tiny_dir, "demo")
    marker = os.path.join(root, "VERSION")
    if not (os.path.exists(marker) and open(marker).read().strip() == VERSION):
        print(f"building the tiny default's demonstration in {root} (once, ~70 s): synthetic data, a small "
              "Qwen2-VL, its warm-up", flush=True)
        tmp = f"{root}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        synth.build(os.path.join(tmp, "data"), train=TRAIN, val=VAL, seed=SEED)
        build_model_dir(os.path.join(tmp, "init"), seed=SEED, words=synth.words(), **SIZES)
        warm_up(os.path.join(tmp, "init"), os.path.join(tmp, "data"), os.path.join(tmp, "model"))
        shutil.rmtree(os.path.join(tmp, "init"))
        with open(os.path.join(tmp, "VERSION"), "w") as f:
            f.write(VERSION)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return paths(tiny_dir)
