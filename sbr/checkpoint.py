"""Checkpoints for resuming (DCP, sharded) and the Hugging Face export (full weights, safetensors).

A checkpoint is written to `<run>/checkpoints/step_XXXXXXX.tmp` and renamed to `step_XXXXXXX` once
every rank has finished, then `<run>/checkpoints/latest` is replaced: a crash mid-save leaves the
previous checkpoint as the latest. It holds the model and optimizer (DCP), and `meta.json` (step,
scheduler, the resolved config) plus one `rank<r>.pt` per rank (RNG states; tensors and plain Python
only, read back with `weights_only=True`). The data position is the step: the order of questions
is a function of the seed and the step.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)


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


def save(run_dir: str, step: int, model, optimizer, scheduler, config: dict) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "scheduler": scheduler.state_dict(), "config": config}, f, indent=2)
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    _barrier()
    return final


def latest(run_dir: str) -> str | None:
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(pointer):
        return None
    return os.path.join(run_dir, "checkpoints", open(pointer).read().strip())


def load(path: str, model, optimizer, scheduler) -> int:
    """Restore everything saved at `path`; returns the step to continue from."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    scheduler.load_state_dict(meta["scheduler"])
    rng = os.path.join(path, f"rank{rank}.pt")
    if os.path.exists(rng):                      # absent when resuming with more ranks than saved
        _set_rng_state(torch.load(rng, weights_only=True))
    return meta["step"]


def export(out_dir: str, policy, processor) -> None:
    """Full weights gathered to rank 0 and written with `save_pretrained` (safetensors), with the
    processor: a folder that `evaluate.py`, `transformers` and vLLM load directly."""
    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        policy.model.save_pretrained(out_dir, state_dict=sd)
        processor.save_pretrained(out_dir)
    _barrier()
