"""What train_grpo.py and train_sft.py share: the data order, the learning-rate schedule, building a
sharded policy, averaging metrics over ranks, and the run's logs (TensorBoard + metrics.jsonl).
"""
import hashlib
import json
import math
import os
import resource

import torch
import torch.distributed as dist

from sbr import checkpoint
from sbr.fsdp import shard
from sbr.grpo import group_advantages
from sbr.model import load_model
from sbr.policy import Policy


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
            epoch, s = divmod(step, self.per_epoch)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            first = (s * self.world + self.rank) * self.q
            yield order[first:first + self.q]

    def __len__(self):
        return self.steps - self.start


def question_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one question's sampling generator: 63 bits of BLAKE2b over (seed, epoch, index), so
    streams differ for every question, epoch and run seed (a test checks all 50,269 training questions
    over several epochs and seeds); a sum like seed * a + epoch * b + index collides once index >= b."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
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


def as_list(items: list) -> list:
    """A DataLoader collate_fn that keeps the decoded items; the scripts collate them per use."""
    return items


def lr_schedule(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate at update u: linear warmup over `warmup` updates, then
    linear decay to 0, cosine decay to 0, or constant."""
    if kind not in ("linear", "cosine", "constant"):
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
                 activation_checkpointing: bool, trust_remote_code: bool = False, mesh=None) -> Policy:
    """fp32 master weights (bf16 compute comes from FSDP2's mixed precision), sharded, on `device`."""
    model = load_model(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if not trainable:
        model.requires_grad_(False)
    policy = Policy(model, suppress_token_ids=suppress, chunk_size=chunk)
    shard(policy, bf16=bf16, activation_checkpointing=activation_checkpointing and trainable, mesh=mesh)
    return policy.to(device)


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


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


class RunLog:
    """Rank 0 writes each step's metrics to `<out_dir>/metrics.jsonl` and TensorBoard (`tb/`)."""
    def __init__(self, out_dir: str, enabled: bool):
        self.out_dir, self.writer = out_dir, None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out_dir, "tb"))

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


def finish(out_dir: str, policy, processor, log: RunLog, *, export: bool) -> None:
    """End a run: the save_pretrained export (if asked), the logs closed, the process group left."""
    if export:
        checkpoint.export(os.path.join(out_dir, "export"), policy, processor)
        if dist.get_rank() == 0:
            print(f"exported to {os.path.join(out_dir, 'export')}", flush=True)
    log.close()
    dist.barrier()
    dist.destroy_process_group()
