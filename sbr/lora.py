r"""LoRA, from scratch (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Each targeted nn.Linear of the language model (W: out x in, frozen) gets two trainable matrices,
A (r x in, Kaiming-uniform as nn.Linear initialises its weight) and B (out x r, zeros), and computes
    y = W x + b + (alpha / r) B (A x)
so at B = 0 the model is exactly the base model. The adapters are parameters of the nn.Linear itself
(`lora_A`, `lora_B`; state-dict keys `...q_proj.lora_A`), applied by a forward hook: every path that
calls the module (the training forward, the group-shared forward, the shared-prefix decode step,
compiled or not) applies them, and FSDP2 shards them with their layer. `off(model)` switches every
adapter off: the frozen reference of GRPO is the base model, no second copy in memory.
`merged_state_dict` folds them into W for an export (W + (alpha / r) B A, computed in fp32 and rounded
once to the export's dtype); `peft_files` writes them alone in the PEFT layout.

Memory at 7B (Qwen2-VL-7B's language model, 28 layers, hidden 3584, MLP 18944, 4 KV heads of 128):
one layer's adapters on all seven projections have r (in + out) parameters each, summed
r x (2 x 3584 + 2 x (3584 + 512) + 2 x 3584 + 3 x (3584 + 18944)) = r x 90,112; x 28 layers =
2.52M r, at r = 64 161.5M parameters (1.9% of the model's 8.29B), their fp32 master + grads + AdamW's
two moments 16 B each: 2.58 GB, against 8.29B x 16 B = 133 GB for full fine-tuning.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from sbr.fsdp import local, local_rows

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_adapter(name: str) -> bool:
    """Whether a parameter or state-dict key is an adapter's."""
    return name.endswith((".lora_A", ".lora_B"))


def _hook(module: nn.Linear, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    if not module.lora_on:
        return out
    x = inputs[0]
    return out + module.lora_scale * F.linear(F.linear(x, module.lora_A.to(x.dtype)), module.lora_B.to(x.dtype))


def targets(model: nn.Module, names=TARGETS, vision: bool = False) -> list[tuple[str, nn.Linear]]:
    """The (name, module) of every nn.Linear whose last name is in `names`, in the language model
    only unless `vision`."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names
             and (vision or "visual" not in n.split("."))]
    if not found:
        raise ValueError(f"--lora_targets {' '.join(names)}: no nn.Linear of the model has these names")
    return found


def add(model: nn.Module, rank: int, alpha: float, names=TARGETS, vision: bool = False,
        dtype: torch.dtype = torch.float32, seed: int = 0) -> list[str]:
    """Freezes every parameter of `model` and gives each target its adapters (in `dtype`, the master
    copy the optimizer steps; FSDP2's mixed precision casts them for compute like any parameter),
    initialised by `reset(model, seed)` unless they are on the meta device (then call `reset` once
    they are allocated). Returns the targets' names."""
    if rank < 1:
        raise ValueError(f"--lora_rank {rank}: expected a rank >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    found = targets(model, names, vision)
    for _, m in found:
        m.lora_A = nn.Parameter(torch.empty(rank, m.in_features, dtype=dtype, device=m.weight.device))
        m.lora_B = nn.Parameter(torch.empty(m.out_features, rank, dtype=dtype, device=m.weight.device))
        m.lora_scale, m.lora_on = alpha / rank, True
        m.register_forward_hook(_hook)
    if found[0][1].weight.device.type != "meta":
        reset(model, seed)
    return [n for n, _ in found]


@torch.no_grad()
def reset(model: nn.Module, seed: int = 0) -> None:
    """A drawn from one generator seeded by `seed`, module after module, the whole matrix each time
    (uniform in ±1/sqrt(in): kaiming_uniform_(a=sqrt(5)), nn.Linear's own init), then each parameter
    keeps the rows its local shard holds (FSDP2's DTensors); B = 0. So the start does not depend on the
    number of ranks, and at B = 0 the model is the base model."""
    gen = torch.Generator().manual_seed(seed)
    for m in adapted(model):
        a = torch.empty(m.lora_A.shape, dtype=torch.float32).uniform_(-1 / math.sqrt(m.in_features),
                                                                      1 / math.sqrt(m.in_features), generator=gen)
        local(m.lora_A).copy_(a[local_rows(m.lora_A)])
        local(m.lora_B).zero_()


def adapted(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A")]


@contextlib.contextmanager
def off(model: nn.Module):
    """Every adapter switched off inside (the base model: GRPO's reference), back on after, even on error."""
    mods = adapted(model)
    for m in mods:
        m.lora_on = False
    try:
        yield model
    finally:
        for m in mods:
            m.lora_on = True


class Base:
    """The policy with its adapters switched off for each call: GRPO's frozen reference (β > 0, GRPO-CARE's
    likelihood) as the base model, without a second model in memory."""
    def __init__(self, policy: nn.Module):
        self.policy = policy

    def logprobs(self, *args, **kwargs):
        with off(self.policy):
            return self.policy.logprobs(*args, **kwargs)

    def reshard(self) -> None:
        if hasattr(self.policy, "reshard"):
            self.policy.reshard()


def scales(model: nn.Module) -> dict[str, float]:
    """Module name -> alpha / r of every adapted module."""
    return {n: m.lora_scale for n, m in model.named_modules() if hasattr(m, "lora_A")}


def merged_state_dict(state: dict[str, torch.Tensor], scales: dict[str, float],
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A plain state dict (base key names, no lora_ keys) with W' = W + scale B A for each adapted
    module (`scales`: module name -> alpha / r), computed in fp32 and rounded once to `dtype`. Consumes
    `state` tensor by tensor (a 7B export holds one copy of the weights, not two)."""
    out = {}
    for k in list(state):
        if is_adapter(k) or k not in state:
            continue
        v = state.pop(k)
        name = k[:-len(".weight")] if k.endswith(".weight") else None
        if name in scales:
            delta = state.pop(f"{name}.lora_B").float() @ state.pop(f"{name}.lora_A").float()
            v = v.float() + scales[name] * delta
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def peft_files(state: dict[str, torch.Tensor], scales: dict[str, float], base: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json's dict, adapter_model.safetensors's tensors) in PEFT's layout: keys
    "base_model.model.<module>.lora_A.weight" (r x in) and ".lora_B.weight" (out x r) for each adapted
    module of `scales` (its path in the transformers model -> alpha / r). The targets are listed by full
    path: Qwen2.5-VL's vision MLP has gate/up/down_proj too, which PEFT's short names would also adapt."""
    tensors = {}
    for n in scales:
        tensors[f"base_model.model.{n}.lora_A.weight"] = state[f"{n}.lora_A"].contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = state[f"{n}.lora_B"].contiguous()
    rank = state[f"{next(iter(scales))}.lora_A"].shape[0]
    config = {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": next(iter(scales.values())) * rank,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
              "base_model_name_or_path": base, "target_modules": list(scales), "inference_mode": True,
              "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None}
    return config, tensors
