"""Leaf helpers shared by every script: distributed set-up, rank-0 printing, seeding, flag checks, UserError.

Imports nothing from sbr. Distributed runs always come from torchrun (never mp.spawn), so one node,
several nodes and Slurm all go through the same `init_distributed`: NCCL on GPUs, gloo on the CPU.
"""
import datetime
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ALLOCATOR = "expandable_segments:True"


def allocator_defaults() -> None:
    """CUDA's caching allocator with expandable segments, unless the user configured it
    (PYTORCH_CUDA_ALLOC_CONF, or torch's newer name PYTORCH_ALLOC_CONF). FSDP2 frees and re-allocates
    unit-sized blocks all run long (a 1 GB layer, the 15.2 GB rollout gather at 7B), between which
    training's activations come and go; with fixed segments the free memory ends up in holes too small
    for the next gather (an out-of-memory error with GBs reserved but unallocated). Read when CUDA's
    allocator starts: if it already has, the setting is applied at run time."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR
    if torch.cuda.is_initialized() and hasattr(torch._C, "_accelerator_setAllocatorSettings"):
        torch._C._accelerator_setAllocatorSettings(ALLOCATOR)


def init_distributed(always: bool = False, timeout_minutes: float = 60) -> Dist:
    """Join the torchrun process group when launched by torchrun. Otherwise run as a single process,
    with (always=True, for FSDP2 training) a one-rank process group on a free local port, so that one
    process and many take the same code path. A collective waits up to `timeout_minutes` (NCCL's own
    default is 10: less than rank 0 may take to write a 7B export to a slow disk, or the others to
    wait for it)."""
    allocator_defaults()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if always and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{_free_port()}", timeout=timeout)
        return Dist(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return Dist(rank, world, local_rank, device)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


FLASH_MIN_CAPABILITY = (8, 0)        # flash-attn 2 runs on Ampere (sm_80) and newer


def choose_attention(compute_dtype: torch.dtype) -> tuple[str, str]:
    """(attn_implementation, why): flash_attention_2 only for bf16/fp16 compute on a CUDA GPU of compute
    capability >= 8.0 with the flash-attn package installed (it raises on fp32 inputs and older GPUs);
    SDPA otherwise. `compute_dtype` is what the attention sees: bf16 under FSDP2's mixed precision even
    though the master weights are fp32."""
    if not torch.cuda.is_available():
        return "sdpa", "no CUDA device"
    if compute_dtype not in (torch.bfloat16, torch.float16):
        return "sdpa", f"flash-attn needs bf16 or fp16 compute; this run computes in {str(compute_dtype).removeprefix('torch.')}"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < FLASH_MIN_CAPABILITY:
        return "sdpa", f"flash-attn 2 needs compute capability >= 8.0; this GPU has {major}.{minor}"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa", "flash-attn is not installed (pip install -e '.[gpu]')"
    return "flash_attention_2", f"{str(compute_dtype).removeprefix('torch.')} compute, compute capability {major}.{minor}"


def make_deterministic() -> None:
    """--deterministic: flash-attn's deterministic backward (transformers reads FLASH_ATTENTION_DETERMINISTIC),
    torch's deterministic algorithms (an op without one raises), cuBLAS's fixed workspace (which those need).
    Bitwise-repeatable GPU runs, a resumed one equal to an uninterrupted one, at a cost not yet measured
    on a GPU (flash-attn's deterministic backward is reported slower). transformers' enable_full_determinism
    (trainer_utils.py) sets the same."""
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def attn_implementation(compute_dtype: torch.dtype = torch.bfloat16) -> str:
    return choose_attention(compute_dtype)[0]


# ---------------------------------------------------------------------------- CLI
DTYPES = ("auto", "float32", "bfloat16")


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a folder, a run to resume): its message names the flag,
    file, line or field and the way out. Each script's entry point prints it as one short message and
    exits with status 2, no traceback (sbr.cli.run); every other exception is a bug and keeps its traceback."""


class ConfigError(UserError, ValueError):
    """Bad flags: the message names each one and what it accepts."""


def check_flags(cfg, *, choices: dict = {}, at_least: dict = {}, above: dict = {}, at_most: dict = {},
                multiple_of: dict = {}) -> None:
    """Every field named in the tables checked at once: `choices` {field: allowed values} (a list field:
    each item), `at_least` {field: minimum}, `above` {field: exclusive minimum}, `at_most` {field: maximum},
    `multiple_of` {field: (divisor, why)}. Raises one ConfigError listing every bad flag."""
    bad = []
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if any(v not in allowed for v in (value if isinstance(value, list) else [value])):
            bad.append(f"--{name} {_show(value)}: expected one of {', '.join(map(str, allowed))}")
    for table, word, ok in ((at_least, ">=", lambda v, b: v >= b), (above, ">", lambda v, b: v > b),
                            (at_most, "<=", lambda v, b: v <= b)):
        for name, bound in table.items():
            value = getattr(cfg, name)
            if value is not None and not ok(value, bound):        # None: a switch left off
                bad.append(f"--{name} {_show(value)}: expected {word} {bound}")
    for name, (divisor, why) in multiple_of.items():
        if getattr(cfg, name) % divisor:
            bad.append(f"--{name} {getattr(cfg, name)}: expected a multiple of {divisor} ({why})")
    if bad:
        raise ConfigError("bad flags:\n  " + "\n  ".join(bad))




def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_model_path(model: str, flag: str = "model") -> None:
    """A --model that is neither an existing folder nor a plausible hub id ("org/name") is "not found"
    here, not a malformed-hub-id error from deep inside transformers; a folder needs config.json and
    weights (an empty or half-made folder is named here, not deep inside from_pretrained)."""
    if not model:
        return
    if os.path.isdir(model):
        files = os.listdir(model)
        weights = [f for f in files if f.endswith((".safetensors", ".safetensors.index.json"))]   # what sbr loads
        if "config.json" not in files or not weights:
            lacks = " and no ".join(x for x, ok in (("config.json", "config.json" in files),
                                                 ("weights (*.safetensors)", weights)) if not ok)
            raise ConfigError(f"--{flag} {model}: a folder with no {lacks}: a model folder is what save_pretrained "
                              "writes (a training run's is <out_dir>/export, written when the run ends; a run "
                              "that stopped early resumes with --resume true and exports)")
        return
    parts = model.split("/")
    local = model.startswith((".", "/", "~")) or len(parts) != 2 or os.path.isdir(parts[0]) or os.path.exists(model)
    if local or not all(re.fullmatch(r"[A-Za-z0-9][\w.-]*", p) for p in parts):
        raise ConfigError(f"--{flag}: not found: {model} (no such model folder, and not a hub id like Qwen/Qwen2-VL-7B-Instruct)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ConfigError(f"--{flag}: not found: {model} (no such folder, and not in the Hugging Face cache, "
                              "which is all there is with HF_HUB_OFFLINE set)")
