"""Checkpoints for resuming (DCP, sharded) and the Hugging Face export (full weights, safetensors).

A checkpoint is written to `<run>/checkpoints/step_XXXXXXX.tmp` and renamed to `step_XXXXXXX` once
every rank has finished, then `<run>/checkpoints/latest` is replaced (a convenience for people: resume
never trusts it). It holds the model and optimizer (DCP), `meta.json` (step, scheduler, world size,
the resolved config and what the script adds, e.g. the training file's sha256) and one `rank<r>.pt`
per rank (RNG states; tensors and plain Python only, read back with `weights_only=True`). The data
position is the step: the order of questions is a function of the seed and the step. After a save
only the newest `keep` complete checkpoints stay (a 7B run's checkpoint with AdamW is ~100 GB).

`resumable(run)` finds the newest *complete* checkpoint by itself: a folder whose meta.json parses and
names its own step, whose DCP metadata reads and whose every storage file is at least as long as the
metadata says, and whose rank files all load. A damaged one is skipped with a message naming the file
and what is wrong, and the one before it is used; a crash between the rename and the pointer update,
or a `latest` holding garbage, changes nothing.

Fault injection for the kill tests: `SBR_KILL_AT=<point>` or `<point>@<step>` (points: save:written,
after every rank wrote; save:renamed, after the rename, before `latest`; export:written, before the
export's rename; export:swapped, after the old export was moved aside, before the new one is renamed
into place) SIGKILLs the process there.
"""
import copy
import glob
import json
import os
import random
import re
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from sbr import lora


# The trained model's checkpoint holds what training changes: with LoRA the adapters (and their AdamW
# state), not the frozen base, which is read from the model's files again on resume (161.5M parameters
# at 7B and r = 64: 0.6 GB + 1.3 GB of AdamW state, against 33 GB + 66 GB for full fine-tuning).
# dcp.load fails on any trained key the checkpoint lacks; `strict=False` only lets the frozen keys be
# absent from what set_state_dict is given.
TRAINED = StateDictOptions(ignore_frozen_params=True)
RESTORED = StateDictOptions(ignore_frozen_params=True, strict=False)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _kill_point(name: str, step: int | None = None) -> None:
    if os.environ.get("SBR_KILL_AT") in (name, f"{name}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def save(run_dir: str, step: int, model, optimizer, scheduler, config: dict, *, keep: int = 0,
         extra: dict | None = None, models: dict | None = None) -> str:
    """Write checkpoint `step` atomically; then keep only the newest `keep` complete ones (0: all).
    `models`: more models saved beside it by name (GRPO-CARE's EMA reference)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        for stale in glob.glob(os.path.join(root, "step_*.tmp")):      # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINED)
    extra_sd = {name: get_model_state_dict(m) for name, m in (models or {}).items()}
    dcp.save({"model": model_sd, "optim": optim_sd, **extra_sd}, checkpoint_id=tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world_size": world, "scheduler": scheduler.state_dict(), "config": config,
                       **(extra or {})}, f, indent=2)
    _barrier()
    _kill_point("save:written", step)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _kill_point("save:renamed", step)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        if keep:
            for _, old in checkpoints(run_dir)[keep:]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Renamed (not .tmp) checkpoint folders, newest first."""
    root = os.path.join(run_dir, "checkpoints")
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = re.fullmatch(r"step_(\d+)", name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


def problem(path: str) -> str | None:
    """What makes the checkpoint at `path` unusable, naming the file; None when it is complete."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        step, world = int(meta["step"]), int(meta.get("world_size", 1))
        missing = [k for k in ("scheduler", "config") if k not in meta]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{meta_path}: unreadable ({type(e).__name__}: {e})"
    if missing:
        return f"{meta_path}: no {' or '.join(missing)}"
    if f"step_{step:07d}" != os.path.basename(path):
        return f"{meta_path}: says step {step}, not the folder's"
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read it makes the checkpoint unusable
        return f"{os.path.join(path, '.metadata')}: unreadable ({type(e).__name__}: {str(e)[:200]})"
    needed = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            return f"{file}: missing"
        if os.path.getsize(file) < size:
            return f"{file}: truncated ({os.path.getsize(file)} bytes, the metadata needs {size})"
    for r in range(world):
        file = os.path.join(path, f"rank{r}.pt")
        try:
            torch.load(file, weights_only=True)
        except Exception as e:  # noqa: BLE001
            return f"{file}: unreadable ({type(e).__name__}: {str(e)[:200]})"
    return None


def resumable(run_dir: str, say=print) -> str | None:
    """The newest complete checkpoint of the run (None if there is none), saying what was skipped."""
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if os.path.exists(pointer):
        named = open(pointer, errors="replace").read().strip()
        if not re.fullmatch(r"step_\d+", named) or not os.path.isdir(os.path.join(run_dir, "checkpoints", named)):
            say(f"{pointer} names {named[:80]!r}, not a checkpoint folder: ignored (resume scans the folder)")
    for _, path in checkpoints(run_dir):
        wrong = problem(path)
        if wrong is None:
            return path
        say(f"skipping damaged checkpoint {path}: {wrong}")
    return None


def load(path: str, model, optimizer, scheduler, models: dict | None = None) -> dict:
    """Restore everything saved at `path` (and `models`, saved by name); returns its meta.json (`step`
    is where to continue)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINED)
    state = {"model": model_sd, "optim": optim_sd, **{name: get_model_state_dict(m) for name, m in (models or {}).items()}}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=RESTORED)
    for name, m in (models or {}).items():
        set_model_state_dict(m, state[name])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    scheduler.load_state_dict(meta["scheduler"])
    rng = os.path.join(path, f"rank{rank}.pt")
    if os.path.exists(rng):                      # absent when resuming with more ranks than saved
        _set_rng_state(torch.load(rng, weights_only=True))
    return meta


def export(out_dir: str, policy, processor, dtype: torch.dtype = torch.float32, adapter_of: str | None = None) -> None:
    """Full weights gathered to rank 0, cast to `dtype` (the base model's, usually: bf16 halves a 7B
    export to ~16.6 GB) and written with `save_pretrained` (safetensors), with the processor: a folder
    that `evaluate.py`, `transformers` and vLLM load directly. LoRA's adapters are merged into the
    weights they adapt (sbr.lora.merged_state_dict); `adapter_of` (the base model's path or hub id) also
    writes them alone in PEFT's layout to `<out_dir>/adapter` (a subfolder, so that transformers never
    takes the merged folder for an adapter). Written to `<out_dir>.tmp` and renamed, so
    a crash never leaves a half export; an export already there (or an overwritten run's, kept by
    sbr.training.clear_run) is moved to `<out_dir>.previous` and deleted only once the new one is in place."""
    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        sd = {k.removeprefix("model."): sd.pop(k) for k in list(sd)}
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        scales = lora.scales(policy.model)
        if scales and adapter_of is not None:
            config, tensors = lora.peft_files(sd, scales, adapter_of)
            os.makedirs(os.path.join(tmp, "adapter"))
            with open(os.path.join(tmp, "adapter", "adapter_config.json"), "w") as f:
                json.dump(config, f, indent=2)
            save_file({k: v.to(dtype) for k, v in tensors.items()}, os.path.join(tmp, "adapter", "adapter_model.safetensors"))
        sd = lora.merged_state_dict(sd, scales, dtype)      # casts tensor by tensor: 7B fp32 is 33 GB on rank 0 already
        policy.model.save_pretrained(tmp, state_dict=sd)
        config = copy.deepcopy(policy.model.config)     # save_pretrained wrote the fp32 master weights' dtype
        for c in (config, *(getattr(config, name) for name in getattr(config, "sub_configs", {}))):
            c.dtype = dtype
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _kill_point("export:written")
        previous = out_dir.rstrip("/") + ".previous"     # the model there stays until this one is in place
        if os.path.isdir(out_dir):
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(out_dir, previous)
        _kill_point("export:swapped")
        os.replace(tmp, out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    _barrier()


def base_dtype(model: str) -> torch.dtype:
    """The dtype a model folder or hub id was saved in (its config's `dtype`), float32 if it says none."""
    from transformers import AutoConfig
    dtype = getattr(AutoConfig.from_pretrained(model), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
