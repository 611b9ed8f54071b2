"""Sharded loading: build the model on the meta device, shard it, and let every rank read from the
safetensors files only the rows of its own shards.

Today's alternative (`load="full"` in the trainers) loads the whole checkpoint in fp32 on every rank
before sharding: for Qwen2-VL-7B that is 8.29B x 4 bytes = 33 GB of host memory a rank, twice (policy
and reference), ~530 GB on an 8-GPU node, and 16 full reads of the files. Here a rank allocates only
its shards (on the GPU directly), and reads through safetensors' memory map exactly those rows: its
peak host memory is one slice in flight (at most the largest tensor: the 151,936 x 3,584 embedding,
2.2 GB in fp32) over the process's baseline, and the files are read once in total across the ranks.

    model = empty_model(path)             parameters on the meta device (buffers too), nothing read
    ... fully_shard(...)                  sbr.fsdp.shard: DTensor parameters, still on meta
    materialize(model, path, device)      allocate the local shards, recompute the buffers (rotary
                                          inv_freq), copy each shard's rows from the files

Checkpoint keys are renamed to module names with transformers' own conversion table (Qwen2-VL's
hub files say `model.layers.0...`, the 5.x modules `model.language_model.layers.0...`). A test loads
both ways under torchrun and compares every parameter bit for bit.
"""
import json
import os

import torch
import torch.distributed as dist

from sbr.common import attn_implementation
from sbr.fsdp import local, local_rows
from sbr.lora import is_adapter
from sbr.model import SUPPORTED, load_model, unreadable_weights
from sbr.positions import install_positions


PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]     # what sbr reads of a hub model


def prefetch(path: str) -> None:
    """Download a hub id's files into the Hugging Face cache before any process group exists, on every
    rank (huggingface_hub locks each file: one process downloads it, the others wait for the lock, then
    find it), so that no collective ever waits on a download: a cold 16.6 GB Qwen2-VL-7B takes longer
    than NCCL's timeout on a slow link. A folder, or "", is left alone."""
    if path and not os.path.isdir(path):
        from huggingface_hub import snapshot_download
        snapshot_download(path, allow_patterns=PATTERNS)


def model_folder(path: str) -> str:
    """A local folder for `path`: a hub id from the cache (prefetch), else downloaded by rank 0 while
    the others wait."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, allow_patterns=PATTERNS, local_files_only=True)
    except OSError:                                  # not prefetched (a caller of build_policy of its own)
        pass
    if not dist.is_initialized() or dist.get_rank() == 0:
        snapshot_download(path, allow_patterns=PATTERNS)
    if dist.is_initialized():
        dist.barrier()
    return snapshot_download(path, allow_patterns=PATTERNS, local_files_only=True)


def empty_model(path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                compute_dtype: torch.dtype | None = None):
    """The model with every parameter and buffer on the meta device, sbr's positions installed; its
    attention chosen for `compute_dtype` (default: `dtype`; sbr.common.choose_attention)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type not in SUPPORTED:
        raise ValueError(f"{path}: model_type {config.model_type!r} is not one of {SUPPORTED} (use --load full)")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation(compute_dtype or dtype),
                                                        trust_remote_code=trust_remote_code)
    install_positions(model)
    return model


def materialize(model, path: str, device, params_device=None) -> None:
    """Allocate `model`'s (sharded) parameters on `device` and fill them from the files at `path`.
    `params_device`: where the parameters live if not on `device` (the host, for FSDP2's CPU offload;
    the buffers still go to `device`). LoRA's adapters (sbr/lora.py) are not in the files: they are
    left for `sbr.lora.reset`."""
    model.to_empty(device=params_device or device)
    for module in model.modules():                 # buffers (rotary inv_freq) are computed, not saved
        if next(module.buffers(recurse=False), None) is not None:
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
            model._init_weights(module)
    from safetensors import SafetensorError
    try:
        load_shards(model, model_folder(path))
    except SafetensorError as e:
        raise unreadable_weights(path, e) from None


def load_on_device(path: str, *, dtype: torch.dtype, device, trust_remote_code: bool = False):
    """The whole model for one process (evaluation: every rank its own copy), allocated on `device`
    and filled tensor by tensor from the files' memory map: no host copy of the weights. from_pretrained
    would load the whole checkpoint into host memory first on every rank (8 x 16.6 GB at 7B in bf16),
    and its device_map, which avoids that, needs accelerate. A model_type sbr does not know (remote
    code) goes through from_pretrained (sbr.model.load_model)."""
    from transformers import AutoConfig
    if AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type not in SUPPORTED:
        return load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    model = empty_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    materialize(model, path, device)
    return model


def load_shards(model, folder: str) -> None:
    """Copy into every parameter the rows of the checkpoint that its local shard holds."""
    from safetensors import safe_open
    rename = _renamer(model)
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False)      # tied weights under both names
              if not is_adapter(n)}
    filled = set()
    for file in _weight_files(folder):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = rename(key)
                if name not in params:
                    if name.endswith("rotary_emb.inv_freq"):       # some old checkpoints saved it
                        continue
                    raise KeyError(f"{file}: tensor {key!r} ({name!r}) is not a parameter of {type(model).__name__}")
                param = params[name]
                mine = local(param)
                with torch.no_grad():
                    mine.copy_(f.get_slice(key)[local_rows(param)].to(mine.dtype))
                filled.add(id(param))
    missing = [n for n, p in params.items() if id(p) not in filled]
    if missing:
        raise KeyError(f"{folder}: no weights for {len(missing)} parameters, e.g. {missing[:3]}")


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _renamer(model):
    """checkpoint key -> module parameter name, as transformers' from_pretrained renames them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta = model.state_dict()

    def rename(key: str) -> str:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converted is not None:
            raise NotImplementedError(f"{key}: this checkpoint needs a weight conversion sbr's sharded loader "
                                      "does not do; pass --load full")
        return name
    return rename
