"""SFT of Qwen2-VL / Qwen2.5-VL / Qwen3-VL on SEED-Bench-R1's distilled chains of thought, the paper's recipe by default.

    python train_sft.py                                   # the tiny default: CPU, a few steps, then export
    torchrun --nproc_per_node 8 train_sft.py --model Qwen/Qwen2-VL-7B-Instruct --data_root /data/SEED-Bench-R1
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint $MASTER:29500 --rdzv_id sbr-sft train_sft.py --model ... --data_root ...
    python train_sft.py ... --resume true                 # continue from the newest complete checkpoint
    python train_sft.py --model ... --dry_run true --plan_world_size 8   # the memory plan per GPU; nothing loads

Data: `annotations/training_with_cot_6k.jsonl`, each record a ready chat `prompt` (video, image, text)
and a `response`. The loss is next-token cross-entropy on the response and its end-of-turn token only,
averaged over every such token of the optimizer step (all micro-batches, all ranks):
    L = -1/N Σ_i Σ_t log π_θ(y_i,t | prompt_i, y_i,<t),   N = Σ_i |y_i| over the global batch
Recipe: lr 2e-5, cosine, 10% warmup, 128 examples a step through gradient accumulation, max length
8192 (a longer example's response is cut to fit, counted), 1 epoch, bf16 + FSDP2 + activation
checkpointing on GPU. The video collator, FSDP2 wrapping, chunked LM head, checkpoints, export and
logs are the ones train_grpo.py uses (sbr/).
"""
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

from sbr import checkpoint, cli
from sbr.collate import SampleDataset, VideoCollator, model_inputs, responses
from sbr.common import (DTYPES, ConfigError, check_flags, check_model_path, choose_attention,
                        init_distributed, make_deterministic, print0, seed_everything)
from sbr.data import load_sft
from sbr.family import check_frame_size, resolve_frame_size
from sbr.fsdp import device_mesh
from sbr.model import load_processor, visual_token_ids
from sbr.memory import plan_for
from sbr.provenance import file_sha256
from sbr.results import training_summary
from sbr.sharded import prefetch
from sbr.tiny import fill_defaults
from sbr.lora import TARGETS as LORA_TARGETS
from sbr.training import (OFFLOADED, SCHEDULES, RunLog, StepSampler, adamw, adapters, all_mean, as_list, build_policy,
                          check_adapters, dry_run, finish, lr_schedule, optimizer_step, peak_memory_mb, preflight, restore,
                          resume_from)


@dataclass
class Config:
    # -------------------------------------------------------------- model and data
    model: str = ""                      # HF folder or hub id; "" = the tiny default's Qwen2-VL
    data_root: str = ""                  # SEED-Bench-R1 root; "" = the tiny default's
    train_file: str = "annotations/training_with_cot_6k.jsonl"  # relative to data_root
    out_dir: str = "runs/sft"            # checkpoints/, export/, tb/, metrics.jsonl
    tiny_dir: str = "runs/tiny"          # where the tiny default is built on first use
    trust_remote_code: bool = False      # allow a model folder's own Python code to run
    # -------------------------------------------------------------- the paper's recipe
    learning_rate: float = 2e-5
    lr_schedule: str = "cosine"          # linear | cosine | constant, after warmup
    warmup_ratio: float = 0.1            # share of the steps spent warming up linearly
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 128                # examples an optimizer step, over all ranks
    micro_batch_size: int = 1            # examples a forward/backward on one rank
    max_length: int = 8192               # prompt + response tokens; longer responses are cut
    num_epochs: int = 1
    max_steps: int = 0                   # optimizer steps; 0 = num_epochs over the file
    # -------------------------------------------------------------- system
    dtype: str = "auto"                  # auto = bf16 compute on GPU (fp32 master weights), fp32 on CPU
    timeout_minutes: float = 60          # how long a collective may wait (NCCL's default, 10, is less than a slow 7B export)
    deterministic: bool = False          # bitwise-repeatable GPU runs: flash-attn's deterministic backward, torch's
                                         # deterministic algorithms (sbr.common.make_deterministic); slower
    shard_group_size: int = 0            # 0 = FSDP2 over all ranks; N = HSDP: shard within N ranks, replicate across
    load: str = "sharded"                # sharded: each rank reads only its own rows; full: all of it, then shards
    dry_run: bool = False                # print the memory plan per GPU and exit, loading nothing
    plan_world_size: int = 0             # the dry run's number of GPUs (0 = torchrun's WORLD_SIZE, or 1)
    gpu_memory_gib: float = 0            # GPU memory to plan against (0 = this machine's GPU; 40 without one)
    activation_checkpointing: bool = True
    logprob_chunk: int = 256             # response tokens per LM-head chunk
    num_workers: int = 2                 # DataLoader workers decoding video
    frame_size: int = 0                  # frames and image resized to this square; 0: the family's (252, the authors'; Qwen3-VL 256)
    max_frames: int = 16                 # at most this many frames a clip, sampled at 2 fps
    on_missing: str = "skip"             # a missing or unreadable video/image: "skip" (replaced, counted) or "error"
    max_bad_media: float = 0.01          # stop once more than this fraction of the training examples had bad media
    preflight: bool = False              # before step 0, check every media file (exists, non-empty, header); report all
    seed: int = 42
    # -------------------------------------------------------------- fewer GPUs: LoRA and offload
    lora_rank: int = 0                   # LoRA's rank r (0 = full fine-tuning): the base frozen in bf16, fp32 adapters (sbr/lora.py)
    lora_alpha: float = 32.0             # the adapters' scale is alpha / r
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # the language model's nn.Linear adapted, by name
    lora_vision: bool = False            # adapt the vision tower's layers of those names too
    offload: str = "none"                # none | params (shards, gradients, AdamW state on the host) | optimizer (AdamW state)
    export_peft: bool = False            # also write the adapters alone in PEFT's layout to <out_dir>/export/adapter
    # -------------------------------------------------------------- logging and checkpoints
    log_every: int = 1
    save_every: int = 50                 # DCP checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2            # the newest N complete checkpoints are kept (7B + AdamW: ~100 GB each)
    resume: bool = False                 # continue from the newest complete checkpoint in out_dir
    allow_config_change: bool = False    # resume although run-changing flags differ from the checkpoint's
    overwrite: bool = False              # start over in an out_dir holding a run (deletes its checkpoints and logs; its
                                         # export is kept as export.previous until this run exports); with --resume: only if none is complete
    export: bool = True                  # save_pretrained to <out_dir>/export at the end
    export_dtype: str = "auto"           # auto = the base model's dtype (bf16 for Qwen2-VL-7B); float32 | bfloat16


def check_config(cfg: Config) -> None:
    """Every flag checked before anything heavy loads; all the bad ones reported together."""
    if not cfg.dry_run:                 # a dry run reads only a configuration (sbr/published.py), with its own errors
        check_model_path(cfg.model)
    if cfg.data_root and not cfg.dry_run and not os.path.isfile(os.path.join(cfg.data_root, cfg.train_file)):
        raise ConfigError(f"--data_root/--train_file: not found: {os.path.join(cfg.data_root, cfg.train_file)}")
    check_flags(cfg, choices={"lr_schedule": SCHEDULES, "dtype": DTYPES, "export_dtype": DTYPES, "load": ("sharded", "full"),
                              "on_missing": ("error", "skip")},
                at_least={"timeout_minutes": 1, "warmup_ratio": 0, "weight_decay": 0, "batch_size": 1, "micro_batch_size": 1,
                          "max_length": 1, "num_epochs": 1, "max_steps": 0, "shard_group_size": 0,
                          "logprob_chunk": 1, "num_workers": 0, "frame_size": 0, "max_frames": 2, "log_every": 1,
                          "save_every": 1, "keep_checkpoints": 1, "plan_world_size": 0, "gpu_memory_gib": 0, "max_bad_media": 0},
                above={"learning_rate": 0, "max_grad_norm": 0}, at_most={"warmup_ratio": 1, "max_bad_media": 1})
    check_frame_size(cfg)
    bad = check_adapters(cfg)
    if bad:
        raise ConfigError("bad flags:\n  " + "\n  ".join(bad))


def tiny_config() -> Config:
    """What `python train_sft.py` runs with no --model: a few quick CPU steps on the tiny default."""
    return Config(batch_size=4, micro_batch_size=2, max_steps=3, save_every=2, learning_rate=1e-3,
                  warmup_ratio=0.0, lr_schedule="constant", num_workers=0, activation_checkpointing=False,
                  out_dir="runs/sft_tiny", overwrite=True)


def preset(given: dict) -> Config | None:
    """With no --model (decided from the parsed flags, so --model=X and --model X are alike), the tiny
    default's values stand in for the defaults; its overwrite holds only for its own out_dir."""
    return None if given.get("model") else cli.own_folder(tiny_config(), given)


def memory_plan(cfg: Config, world: int) -> str:
    """What each GPU will hold (sbr/memory.py), against its memory, and which flags would lower the peak."""
    return plan_for(cfg, world, "sft")


def main(cfg: Config) -> list[dict]:
    check_config(cfg)
    if cfg.dry_run:                                 # the plan only: no process group, no weights
        return dry_run(cfg, memory_plan)
    prefetch(cfg.model)                             # a hub id's files, before any collective could wait on them
    if cfg.deterministic:
        make_deterministic()
    owned = not dist.is_initialized()                 # left at the end only if made here
    d = init_distributed(always=True, timeout_minutes=cfg.timeout_minutes)
    model, data_root = fill_defaults(cfg.model, cfg.data_root, cfg.tiny_dir)
    cfg = replace(cfg, model=model, data_root=data_root,
                  frame_size=resolve_frame_size(cfg.frame_size, model, cfg.trust_remote_code))
    seed_everything(cfg.seed + d.rank)
    per_rank = cfg.batch_size // d.world_size
    if cfg.batch_size % (cfg.micro_batch_size * d.world_size):
        raise ConfigError(f"--batch_size {cfg.batch_size}: not a multiple of --micro_batch_size "
                          f"{cfg.micro_batch_size} x {d.world_size} ranks")
    accumulation = per_rank // cfg.micro_batch_size
    bf16 = d.device.type == "cuda" if cfg.dtype == "auto" else cfg.dtype == "bfloat16"
    os.makedirs(cfg.out_dir, exist_ok=True)

    # ------------------------------------------------------------------ data, model, optimizer
    train_path = os.path.join(cfg.data_root, cfg.train_file)
    train = load_sft(train_path, cfg.data_root, on_missing=cfg.on_missing)
    if cfg.preflight:
        train = preflight(train, cfg.on_missing)
    if len(train) < cfg.batch_size:
        raise ConfigError(f"--batch_size {cfg.batch_size}: {train_path} has {len(train)} examples, fewer than one "
                          "step takes; lower --batch_size (a multiple of --micro_batch_size x ranks) or give more data")
    total_steps = cfg.max_steps or cfg.num_epochs * (len(train) // cfg.batch_size)
    run_data = {"train_sha256": file_sha256(train_path)}      # saved in every checkpoint, checked on resume
    resume = resume_from(cfg, d.world_size, run_data)         # before the model loads: a wrong resume fails fast
    if d.is_main:                                   # built on the meta device: once, where it is printed
        print(memory_plan(cfg, d.world_size), flush=True)
    processor = load_processor(cfg.model, trust_remote_code=cfg.trust_remote_code)
    policy = build_policy(cfg.model, device=d.device, bf16=bf16, suppress=visual_token_ids(processor.tokenizer),
                          chunk=cfg.logprob_chunk, trainable=True, activation_checkpointing=cfg.activation_checkpointing,
                          trust_remote_code=cfg.trust_remote_code, mesh=device_mesh(cfg.shard_group_size, d.device.type),
                          load=cfg.load, lora=adapters(cfg), offload=cfg.offload == "params")
    optimizer = adamw(policy, cfg)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.lr_schedule, warmup, total_steps))
    start, skips = restore(resume, policy, optimizer, scheduler, train, cfg.max_bad_media)
    collator = VideoCollator(processor, padding_side="left", frame_size=cfg.frame_size, max_frames=cfg.max_frames)
    sampler = StepSampler(len(train), total_steps, start, d.rank, d.world_size, per_rank, cfg.seed)
    dataset = SampleDataset(train, collator, on_bad=cfg.on_missing, replace=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=as_list)
    if d.is_main:
        cli.save_config(cfg, os.path.join(cfg.out_dir, "config.json"))
    log = RunLog(cfg.out_dir, enabled=d.is_main, start=start)   # drops what was logged past the checkpoint
    print0(f"SFT: {cfg.model} on {d.world_size} x {d.device.type} ({'bf16' if bf16 else 'fp32'}), {len(train)} "
           f"examples, steps {start}..{total_steps}, {cfg.batch_size} a step = {cfg.micro_batch_size} x "
           f"{accumulation} accumulation x {d.world_size} ranks")
    if cfg.offload != "none":
        print0(f"--offload {cfg.offload}: {OFFLOADED[cfg.offload]} in host memory")
    print0(f"attention: {policy.model.config._attn_implementation} "
           f"({choose_attention(torch.bfloat16 if bf16 else torch.float32)[1]})")

    history = []
    for step, items in zip(range(start, total_steps), loader):
        t0 = time.time()
        bad_media = skips.update(items)
        # -------------------------------------------------------------- micro-batches; the step's token count first
        micro = []
        for i in range(0, len(items), cfg.micro_batch_size):
            part = items[i:i + cfg.micro_batch_size]
            inputs = model_inputs(collator(part), d.device)
            ids, mask, cut = responses(collator, part, inputs["attention_mask"].sum(1).tolist(), cfg.max_length,
                                       d.device)
            micro.append((inputs, ids, mask, cut))
        tokens = torch.tensor(float(sum(m[2].sum().item() for m in micro)), device=d.device)
        dist.all_reduce(tokens)                                   # N: response tokens of the global step

        # -------------------------------------------------------------- forward/backward, one update
        policy.train()
        loss_sum = 0.0
        for inputs, ids, mask, _ in micro:
            logp, _ = policy.logprobs(inputs, ids, 1, share_prompt=False)               # (b, R)
            nll = -(logp * mask).sum()
            # FSDP averages gradients over ranks: scale so the result is the global token mean
            (nll * d.world_size / tokens.clamp(min=1)).backward()
            loss_sum += nll.item()
        grad_norm = optimizer_step(policy, optimizer, scheduler, cfg.max_grad_norm)

        # -------------------------------------------------------------- logs and checkpoints
        local = {"loss": loss_sum * d.world_size / max(tokens.item(), 1), "grad_norm": grad_norm,
                 "cut_responses": float(sum(m[3] for m in micro)), "bad_media": bad_media}
        metrics = all_mean(local, d.device)
        elapsed = time.time() - t0
        metrics.update(step=step + 1, lr=scheduler.get_last_lr()[0], step_time=elapsed, response_tokens=tokens.item(),
                       tokens_per_s=tokens.item() / elapsed, peak_memory_mb=peak_memory_mb(d.device))
        history.append(metrics)
        log.write(metrics)
        if d.is_main and (step + 1) % cfg.log_every == 0:
            print0(f"step {step + 1}/{total_steps} loss {metrics['loss']:.4f} |g| {metrics['grad_norm']:.3f} "
                   f"lr {metrics['lr']:.2e} {elapsed:.2f}s")
        if (step + 1) % cfg.save_every == 0 or step + 1 == total_steps:
            checkpoint.save(cfg.out_dir, step + 1, policy, optimizer, scheduler, asdict(cfg),
                            keep=cfg.keep_checkpoints, extra={**run_data, "bad_media": sorted(skips.lines)})

    finish(cfg.out_dir, policy, processor, log, export=cfg.export, export_dtype=cfg.export_dtype, model=cfg.model,
           peft=cfg.export_peft,
           leave=owned)
    if d.is_main:
        print(training_summary(cfg.out_dir), flush=True)
    return history


if __name__ == "__main__":
    cli.run(main, Config, preset=preset)
