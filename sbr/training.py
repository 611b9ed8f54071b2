"""What train_grpo.py and train_sft.py share: the data order, the learning-rate schedule, building a
sharded policy, averaging metrics over ranks, and the run's logs (TensorBoard + metrics.jsonl).
"""
import dataclasses
import glob
import hashlib
import json
import math
import os
import resource
import shutil

import torch
import torch.distributed as dist

from sbr import checkpoint
from sbr.common import ConfigError, attn_implementation, print0
from sbr.data import DataError, Samples, media_problems
from sbr.fsdp import local, shard
from sbr.grpo import group_advantages
from sbr.lora import TARGETS, add as add_adapters, reset as reset_adapters
from sbr.model import load_model
from sbr.offload import HostAdamW
from sbr.policy import Policy
from sbr.sharded import empty_model, materialize
from sbr.tiny import fill_defaults


class StepSampler:
    """Batches of dataset indices for one rank, step by step from `start`: step s on rank r takes
    slots [(s W + r) Q, (s W + r + 1) Q) of its epoch's permutation (seeded by seed + epoch), so the
    data position is the step and ranks see distinct questions."""
    def __init__(self, n: int, steps: int, start: int, rank: int, world: int, per_rank: int, seed: int):
        self.n, self.steps, self.start, self.rank, self.world, self.q, self.seed = n, steps, start, rank, world, per_rank, seed
        self.per_epoch = n // (world * per_rank)
        if self.per_epoch == 0:
            raise ValueError(f"{n} examples cannot fill one step of {world} ranks x {per_rank}")

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield self.step_questions(step, self.rank)

    def step_questions(self, step: int, rank: int | None = None) -> list[int]:
        """Step `step`'s questions on `rank`, or (None) on every rank."""
        epoch, s = divmod(step, self.per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        first = s * self.world * self.q
        if rank is None:
            return order[first:first + self.world * self.q]
        return order[first + rank * self.q:first + (rank + 1) * self.q]

    def __len__(self):
        return self.steps - self.start


def question_seed(seed: int, epoch: int, index: int, salt: str = "") -> int:
    """The seed of one question's sampling generator: 63 bits of BLAKE2b over (seed, epoch, index), so
    streams differ for every question, epoch and run seed (a test checks all 50,269 training questions
    over several epochs and seeds); a sum like seed * a + epoch * b + index collides once index >= b.
    `salt`: another stream for the same question (dynamic sampling's extra rollouts)."""
    key = f"{seed}:{epoch}:{index}" + (f":{salt}" if salt else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def step_advantages(rewards: torch.Tensor, group_size: int, scale: str, device) -> torch.Tensor:
    """This rank's group advantages; scale="batch" divides by the std of every rank's rewards of the
    step (each rank holds the same number), as TRL does, not by this rank's."""
    everyone = None
    if scale == "batch" and dist.is_initialized() and dist.get_world_size() > 1:
        local = rewards.to(device=device, dtype=torch.float32)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        everyone = torch.cat(parts).cpu()
    return group_advantages(rewards, group_size, scale=scale, batch_rewards=everyone).to(device)


class MediaSkips:
    """Training questions whose video or image could not be read, over the whole run and all ranks, by
    annotation line. Each is printed once; past `max_fraction` of the training file the run stops with
    an error listing them (a broken dataset is not something to train through)."""
    def __init__(self, samples: Samples, max_fraction: float, known=()):
        self.samples, self.max_fraction = samples, max_fraction
        self.lines = set(known) | {line for line, _ in samples.skipped}
        self.total = len(samples) + len(samples.skipped)
        self.errors = [f"line {line}: {path} missing" for line, path in samples.skipped]
        self.check()

    def update(self, items: list[dict]) -> int:
        """Collect this step's skips from every rank (a collective); returns the run's count."""
        mine = [(self.samples[s["index"]].source[1], s["error"]) for item in items for s in item["skipped"]]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for line, error in (x for part in everyone for x in part):
            if line not in self.lines:
                self.lines.add(line)
                self.errors.append(error)
                print0(f"bad media, question replaced: {error}")
        self.check()
        return len(self.lines)

    def check(self) -> None:
        if len(self.lines) > self.max_fraction * self.total:
            raise DataError(f"{len(self.lines)} of {self.total} training questions have missing or unreadable media, "
                            f"more than --max_bad_media {self.max_fraction}:\n  " + "\n  ".join(self.errors[:20]))


def preflight(samples: Samples, on_missing: str) -> Samples:
    """Check every media file before step 0 (sbr.data.media_problems); report all problems at once:
    an error with on_missing="error", else those questions are dropped (and counted) before training."""
    problems = media_problems(samples)
    if not problems:
        print0(f"preflight: the media of all {len(samples)} questions look fine")
        return samples
    text = f"preflight: {len(problems)} of {len(samples)} questions have bad media:\n  " + "\n  ".join(problems.values())
    if on_missing == "error":
        raise DataError(text)
    print0(text + "\n(dropped; --on_missing error stops instead)")
    kept = [x for i, x in enumerate(samples) if i not in problems]
    dropped = [(samples[i].source[1], problems[i]) for i in problems]
    return Samples(kept, samples.skipped + dropped)


def as_list(items: list) -> list:
    """A DataLoader collate_fn that keeps the decoded items; the scripts collate them per use."""
    return items


SCHEDULES = ("linear", "cosine", "constant")


def lr_schedule(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate at update u: linear warmup over `warmup` updates, then
    linear decay to 0, cosine decay to 0, or constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_schedule must be linear, cosine or constant, got {kind!r}")

    def f(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        progress = (update - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return f


def build_policy(path: str, *, device, bf16: bool, suppress: list[int], chunk: int, trainable: bool,
                 activation_checkpointing: bool, trust_remote_code: bool = False, mesh=None,
                 load: str = "sharded", compile_decode: bool = False, fp32: bool = False,
                 lora: dict | None = None, offload: bool = False) -> Policy:
    """A sharded Policy on `device`. Trainable: fp32 master weights, bf16 compute from FSDP2's mixed
    precision. Frozen (the reference): its parameters kept in bf16 when computing in bf16, no fp32
    copy and no gradients; `fp32` keeps them fp32 (an EMA reference: updates of 0.005 x a 1e-6 step
    would vanish in bf16's 8-bit mantissa). load="sharded": meta-device init, each rank reads only its own rows
    (sbr/sharded.py); "full": every rank loads the whole checkpoint on the CPU, then shards it.
    `lora` (sbr.lora.add's rank, alpha, names, vision, seed): the base frozen as a reference is, fp32
    adapters added before sharding (FSDP2 shards them with their layer's unit), drawn once the rows are
    in place. `offload`: the shards live on the host (sbr.fsdp.shard)."""
    frozen = not trainable or lora is not None
    dtype = torch.bfloat16 if bf16 and frozen and not fp32 else torch.float32
    compute = torch.bfloat16 if bf16 else torch.float32          # what the attention sees (FSDP2 casts to it)
    if load == "full":
        model = load_model(path, dtype=torch.float32, attn=attn_implementation(compute),
                           trust_remote_code=trust_remote_code)
        for param in model.parameters():       # not model.to(dtype): that would round the fp32 RoPE inv_freq too
            param.data = param.data.to(dtype)
    else:
        model = empty_model(path, dtype=dtype, compute_dtype=compute, trust_remote_code=trust_remote_code)
    if not trainable:
        model.requires_grad_(False)
    if lora is not None:
        try:
            add_adapters(model, **lora)        # freezes the base; on the meta device, drawn below
        except ValueError as e:                # no layer of those names
            raise ConfigError(str(e)) from None
    policy = Policy(model, suppress_token_ids=suppress, chunk_size=chunk, compile_decode=compile_decode)
    shard(policy, bf16=bf16, activation_checkpointing=activation_checkpointing and trainable, mesh=mesh,
          offload=offload)
    if load == "full":
        return policy.to(device)
    materialize(model, path, device, params_device="cpu" if offload else None)
    if lora is not None:
        reset_adapters(model, lora.get("seed", 0))
    return policy


def adapters(cfg) -> dict | None:
    """build_policy's `lora` from a script's Config (--lora_rank 0: None, full fine-tuning). The adapters'
    draw is seeded by the run's seed."""
    if not cfg.lora_rank:
        return None
    return dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, names=tuple(cfg.lora_targets), vision=cfg.lora_vision,
                seed=cfg.seed)


def check_adapters(cfg) -> list[str]:
    """What is wrong with the LoRA and offload flags of a script's Config (both scripts have them)."""
    bad = []
    if cfg.lora_rank < 0:
        bad.append(f"--lora_rank {cfg.lora_rank}: expected 0 (full fine-tuning) or a rank >= 1")
    if cfg.lora_rank and cfg.lora_alpha <= 0:
        bad.append(f"--lora_alpha {cfg.lora_alpha}: expected > 0 (the adapters' scale is alpha / rank)")
    unknown = [n for n in cfg.lora_targets if n not in TARGETS]
    if cfg.lora_rank and not cfg.lora_targets:
        bad.append("--lora_targets: expected at least one name, e.g. q_proj v_proj")
    elif cfg.lora_rank and unknown and not cfg.lora_vision:           # the vision towers' names differ by family
        bad.append(f"--lora_targets {' '.join(unknown)}: not a layer of the language model; expected names from "
                   f"{' '.join(TARGETS)}")
    if cfg.export_peft and not cfg.lora_rank:
        bad.append("--export_peft true writes LoRA adapters: add --lora_rank (e.g. 64), or leave it false")
    if cfg.offload not in OFFLOAD:
        bad.append(f"--offload {cfg.offload}: expected one of {', '.join(OFFLOAD)}")
    elif cfg.offload == "params" and cfg.load == "full":
        bad.append(f"--offload {cfg.offload} needs --load sharded (each rank's shards are allocated on the host)")
    return bad


OFFLOAD = ("none", "params", "optimizer")
OFFLOADED = {"params": "the parameter shards, their gradients and the AdamW state (the step on the CPU)",
             "optimizer": "the AdamW state (the step on the GPU, a chunk at a time; on a CPU it stays in place)"}


@torch.no_grad()
def ema_update(reference, policy, decay: float) -> None:
    """reference ← decay · reference + (1 - decay) · policy, parameter by parameter. Both are built by
    `build_policy` from the same model and sharded the same way, so each rank updates its own shards."""
    torch._foreach_lerp_([local(p) for p in reference.parameters()], [local(p) for p in policy.parameters()],
                         1.0 - decay)


def trainable(policy) -> list:
    """The parameters the optimizer steps: all of them, or with LoRA the adapters only (the base has no
    AdamW state)."""
    return [p for p in policy.parameters() if p.requires_grad]


def adamw(policy, cfg) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; with --offload optimizer its state lives on the host and each
    step streams it through the GPU (sbr/offload.py), the same numbers."""
    kind = HostAdamW if cfg.offload == "optimizer" else torch.optim.AdamW
    return kind(trainable(policy), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def optimizer_step(policy, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the gradients' global norm (DTensors under FSDP2), step optimizer and schedule, clear the
    gradients. Returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def all_mean(values: dict, device) -> dict:
    """Average a dict of floats over ranks."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def all_gather_1d(x: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D tensor (each of its own length), concatenated in rank order."""
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    padded = x.new_zeros(max(int(s) for s in sizes))
    padded[:x.numel()] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(s)] for o, s in zip(out, sizes)])


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


class RunLog:
    """Rank 0 writes each step's metrics to `<out_dir>/metrics.jsonl` and TensorBoard (`tb/`). Opened at
    step `start` (where the run resumed from, or 0), it first drops every record past `start` from
    metrics.jsonl and rollouts.jsonl, and TensorBoard purges its events past `start`: a resumed run's
    logs hold each step exactly once."""
    def __init__(self, out_dir: str, enabled: bool, start: int = 0):
        self.out_dir, self.writer = out_dir, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            for name in ("metrics.jsonl", "rollouts.jsonl"):
                _keep_steps_up_to(os.path.join(out_dir, name), start)
            self.writer = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start + 1)

    def write(self, metrics: dict) -> None:
        if self.writer is None:
            return
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for k, v in metrics.items():
            if k != "step":
                self.writer.add_scalar(k if "/" in k else f"train/{k}", v, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _keep_steps_up_to(path: str, start: int) -> None:
    """Rewrite a JSON-lines log keeping the records of steps <= start (a torn last line goes too)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= start:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# What a resumed run may change without changing the run itself; every other field must match the
# checkpoint's (or --allow_config_change).
RUN_NEUTRAL = {"resume", "out_dir", "tiny_dir", "num_workers", "log_every", "rollout_log_every", "save_every",
               "keep_checkpoints", "allow_config_change", "overwrite", "export", "export_dtype", "preflight",
               "trust_remote_code", "load", "dry_run", "plan_world_size", "gpu_memory_gib", "compile_decode",
               "timeout_minutes", "deterministic", "offload", "export_peft"}
RUN_FILES = ("checkpoints", "export", "tb", "metrics.jsonl", "rollouts.jsonl", "config.json")
PREVIOUS = "export.previous"     # an overwritten run's export, kept until this run's own export replaces it


def earlier_run(out_dir: str) -> list[str]:
    """What in out_dir shows an earlier run: checkpoint folders, an export, logged steps."""
    found = [os.path.relpath(p, out_dir) for p in glob.glob(os.path.join(out_dir, "checkpoints", "step_*"))]
    found += [name for name in ("export", PREVIOUS) if os.path.isdir(os.path.join(out_dir, name))]
    metrics = os.path.join(out_dir, "metrics.jsonl")
    found += ["metrics.jsonl"] if os.path.exists(metrics) and os.path.getsize(metrics) else []
    return sorted(found)


def clear_run(out_dir: str) -> None:
    """--overwrite: delete the earlier run's checkpoints and logs; its export becomes export.previous
    (deleted once this run's export is complete, sbr.checkpoint.export), so a crash loses no model."""
    export = os.path.join(out_dir, "export")
    if os.path.isdir(export):
        shutil.rmtree(os.path.join(out_dir, PREVIOUS), ignore_errors=True)
        os.replace(export, os.path.join(out_dir, PREVIOUS))
        print(f"--overwrite: {export} kept as {os.path.join(out_dir, PREVIOUS)} until this run exports (with "
              "--export false, until you delete it)", flush=True)
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def resume_from(cfg, world_size: int, extra: dict) -> str | None:
    """The checkpoint this run continues from, or None to start at step 0. Nothing is ever started over
    silently: an out_dir holding an earlier run (checkpoints, an export, logged steps) needs --resume
    true (continue it) or --overwrite true (start over). --resume takes the newest complete checkpoint
    (damaged ones skipped, with a message), whose saved flags, world size and `extra` (e.g. the training
    file's sha256) must equal this run's; with none complete it stops, naming what is damaged, unless
    --overwrite true is given too (resume when possible, else start over: for a job script that always
    passes both). An empty or new out_dir with --resume starts at step 0, saying so."""
    path = checkpoint.resumable(cfg.out_dir, say=print0) if cfg.resume else None
    if path is None:
        held = earlier_run(cfg.out_dir)
        if held and not cfg.overwrite:
            listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            if cfg.resume:
                damaged = [f"{p}: {checkpoint.problem(p)}" for _, p in checkpoint.checkpoints(cfg.out_dir)]
                raise ConfigError(f"--resume: {cfg.out_dir} holds an earlier run ({listed}) but no complete checkpoint"
                                  + (":\n  " + "\n  ".join(damaged) if damaged else "") + "\n--overwrite true "
                                  "deletes it and starts over from step 0, or choose another --out_dir")
            raise ConfigError(f"{cfg.out_dir} holds an earlier run ({listed}): --resume true continues it, "
                              "--overwrite true deletes it and starts over, or choose another --out_dir")
        dist.barrier()                              # every rank has looked before rank 0 deletes anything
        if held and dist.get_rank() == 0:
            clear_run(cfg.out_dir)
        dist.barrier()
        if cfg.resume and not held:
            print0(f"--resume: {cfg.out_dir} holds no run yet: starting from step 0")
        elif cfg.resume:
            print0(f"--resume: no complete checkpoint in {cfg.out_dir}; starting over (--overwrite true)")
        return None
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    saved = {**meta["config"], "world size": meta.get("world_size", 1), **{k: meta.get(k) for k in extra}}
    now = {**dataclasses.asdict(cfg), "world size": world_size, **extra}
    changed = [f"{'--' + k if k in now and ' ' not in k else k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
               for k in sorted(set(saved) | set(now)) if k not in RUN_NEUTRAL and saved.get(k) != now.get(k)]
    if changed and not cfg.allow_config_change:
        raise ConfigError(f"{path} was made by a different run:\n  " + "\n  ".join(changed)
                          + "\nResuming would continue it with other settings; --allow_config_change true accepts that, "
                          "--overwrite true (without --resume) starts over")
    if changed:
        print0("resuming with changed settings (--allow_config_change):\n  " + "\n  ".join(changed))
    return path


def restore(path: str | None, policy, optimizer, scheduler, train: Samples, max_bad_media: float,
            models: dict | None = None):
    """Load the checkpoint at `path` (None: a fresh start), and `models` saved beside the policy (an EMA
    reference). Returns the step to continue from and the run's record of questions with bad media
    (carried in the checkpoint)."""
    start, seen = 0, []
    if path:
        meta = checkpoint.load(path, policy, optimizer, scheduler, models=models)
        start, seen = meta["step"], meta.get("bad_media", [])
        print0(f"resumed from {path} at step {start}")
    return start, MediaSkips(train, max_bad_media, seen)


def dry_run(cfg, memory_plan) -> list:
    """--dry_run: print `memory_plan(cfg, world)` (rank 0 of a torchrun) and nothing else: no process
    group, no data (--data_root is not needed), no weights, no network. Only the model's configuration is
    read (sbr/published.py): a folder's config.json (nothing else need be there), or sbr's copy of a
    published one for its hub id. An empty --model is the tiny default's model (built on first use)."""
    if int(os.environ.get("RANK", 0)) != 0:         # printed once; the other ranks build nothing
        return []
    model = cfg.model or fill_defaults("", "-", cfg.tiny_dir)[0]
    world = cfg.plan_world_size or int(os.environ.get("WORLD_SIZE", 1))
    print(memory_plan(dataclasses.replace(cfg, model=model), world), flush=True)
    return []


def finish(out_dir: str, policy, processor, log: RunLog, *, export: bool, export_dtype: str, model: str,
           peft: bool = False, leave: bool = True) -> None:
    """End a run: the save_pretrained export (if asked) in `export_dtype` ("auto": `model`'s own; LoRA's
    adapters merged in, and with `peft` also written alone to export/adapter), the logs closed, the
    process group left (`leave`: unless the caller made it, e.g. bench/gpu_check.py)."""
    if export:
        dtype = checkpoint.base_dtype(model) if export_dtype == "auto" else getattr(torch, export_dtype)
        checkpoint.export(os.path.join(out_dir, "export"), policy, processor, dtype, adapter_of=model if peft else None)
        if dist.get_rank() == 0:
            print(f"exported to {os.path.join(out_dir, 'export')} ({str(dtype).removeprefix('torch.')})", flush=True)
    log.close()
    dist.barrier()
    if leave:
        dist.destroy_process_group()
