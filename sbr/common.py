"""Leaf helpers shared by every script: distributed set-up, rank-0 printing, seeding, CLI parsing.

Imports nothing from sbr. Distributed runs always come from torchrun (never mp.spawn), so one node,
several nodes and Slurm all go through the same `init_distributed`: NCCL on GPUs, gloo on the CPU.
"""
import argparse
import dataclasses
import json
import os
import random
import re
import sys
import typing
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


def init_distributed(always: bool = False) -> Dist:
    """Join the torchrun process group when launched by torchrun. Otherwise run as a single process,
    with (always=True, for FSDP2 training) a one-rank process group on a free local port, so that one
    process and many take the same code path."""
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if always and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{_free_port()}")
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
        dist.init_process_group(backend, rank=rank, world_size=world)
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


def attn_implementation() -> str:
    """flash_attention_2 only where CUDA and the flash-attn package are both present, else SDPA."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


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
            if not ok(value, bound):
                bad.append(f"--{name} {_show(value)}: expected {word} {bound}")
    for name, (divisor, why) in multiple_of.items():
        if getattr(cfg, name) % divisor:
            bad.append(f"--{name} {getattr(cfg, name)}: expected a multiple of {divisor} ({why})")
    if bad:
        raise ConfigError("bad flags:\n  " + "\n  ".join(bad))


FRAME_SIZE = {"frame_size": (28, "14-pixel patches, merged 2x2")}     # check_flags(multiple_of=...)


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_model_path(model: str, flag: str = "model") -> None:
    """A --model that is neither an existing folder nor a plausible hub id ("org/name") is "not found"
    here, not a malformed-hub-id error from deep inside transformers."""
    if not model or os.path.isdir(model):
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


def parse_cli(config_cls, argv=None, defaults=None, check=None):
    """`--field value` for every dataclass field, named exactly as the field (no abbreviations: `--lr`
    is an error, not `--lr_schedule`); bools take true/false. `defaults`: an instance (a preset) whose
    values the flags override instead of the class defaults. `check(cfg)`: the script's flag checks,
    whose ConfigError becomes a usage error."""
    parser = argparse.ArgumentParser(description=(sys.modules[config_cls.__module__].__doc__ or "").split("\n")[0],
                                     allow_abbrev=False)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, default=default, nargs="?", const=True)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            parser.add_argument(f"--{f.name}", type=item, nargs="*", default=default)
        else:
            parser.add_argument(f"--{f.name}", type=_optional(kind), default=default)
    cfg = config_cls(**vars(parser.parse_args(argv)))
    if check is not None:
        try:
            check(cfg)
        except ConfigError as e:
            parser.error(str(e))
    return cfg


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind):
    """`int | None` and friends: parse with the non-None type; the word 'none' gives None."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if args else kind

    def parse(text):
        return None if text.lower() == "none" and args else base(text)
    return parse


def save_config(cfg, path: str) -> None:
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
