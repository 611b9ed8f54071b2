"""FSDP2 wrapping (torchtitan's recipe): one `fully_shard` unit per decoder layer, one for the vision
tower, then the root. bf16 compute with fp32 master weights and fp32 gradient reduction on GPU.
Activation checkpointing is Hugging Face's per-layer one, switched on before sharding.

The root does not cast its forward inputs to bf16 (each inner unit still casts its own): the Policy's
methods receive the whole batch, and Qwen2.5-VL's `second_per_grid_ts` must reach the mRoPE positions in
fp32 (bf16 turns 1.07 s into 1.0703125 s and 0.999 s into 1.0, moving temporal positions).

The vision tower is its own unit so that a forward that does not reach it leaves no parameters half
gathered, and the Policy's methods are registered as forward methods so calling them gathers the
root's parameters (embeddings, final norm, LM head) as `forward` would.
"""
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

FORWARD_METHODS = ("prefill", "decode", "logprobs")


def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's local shard, or a plain tensor's data."""
    return param.to_local() if hasattr(param, "to_local") else param.data


def local_rows(param: torch.Tensor) -> tuple[slice, ...]:
    """Where this rank's shard of `param` (a DTensor, or a plain tensor: all of it) lies in the whole tensor."""
    if not hasattr(param, "device_mesh"):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def device_mesh(shard_group_size: int, device_type: str):
    """None (FSDP over all ranks) for 0, else a 2-D mesh for HSDP: parameters sharded within groups of
    `shard_group_size` consecutive ranks (a node: NVLink) and replicated across groups, so only the
    gradient all-reduce crosses nodes."""
    if not shard_group_size:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    world = torch.distributed.get_world_size()
    if world % shard_group_size:
        raise ValueError(f"world size {world} is not a multiple of shard_group_size {shard_group_size}")
    return init_device_mesh(device_type, (world // shard_group_size, shard_group_size),
                            mesh_dim_names=("replicate", "shard"))


def shard(policy, *, bf16: bool, activation_checkpointing: bool = False, mesh=None, offload: bool = False):
    """Shard a `sbr.policy.Policy` in place and return it. `offload`: FSDP2's CPUOffloadPolicy, the
    sharded parameters, their gradients and the optimizer's state on the host (pinned on a GPU machine),
    each unit copied to the GPU when it is gathered, the optimizer step run on the CPU."""
    if activation_checkpointing:
        policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    host = dict(offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())) if offload else {}
    for layer in policy.inner.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, **host)
    fully_shard(policy.inner.visual, mesh=mesh, mp_policy=mp, **host)          # casts the pixels to bf16 itself
    fully_shard(policy, mesh=mesh, mp_policy=replace(mp, cast_forward_inputs=False), **host)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(policy, name)
    return policy


@contextmanager
def gathered(policy):
    """All-gather every unit's parameters once for a whole rollout (prefill and every decoded token),
    instead of once per forward, i.e. per token, which is what makes FSDP + generate() slow; reshard at
    the end. sbr's decoding step calls the layers' parts directly, so it needs this. A no-op for a
    module that is not sharded, and inside another `gathered` of the same policy."""
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)] if isinstance(policy, torch.nn.Module) else []
    if not units or getattr(policy, "_sbr_gathered", False):
        yield
        return
    inner = [m for m in units if m is not policy]        # the root keeps FSDP2's own root policy
    for m in inner:
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    policy._sbr_gathered = True
    try:
        yield
    finally:
        policy._sbr_gathered = False
        for m in inner:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
        if policy in units:
            policy.reshard()


def release(module) -> None:
    """Reshard one unit before `gathered` ends: the vision tower once the prefill has read it (decoding
    never does), which gives its bf16 copy back for the whole decoding (1.35 GB at 7B). A no-op for a
    module that is not an FSDP2 unit; a later forward all-gathers it again, as FSDP2 always does."""
    if isinstance(module, FSDPModule):
        module.reshard()
