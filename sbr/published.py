"""A model's configuration without its weights or the network: a folder holding config.json (nothing
else is needed), sbr's copy of a published config.json for the hub ids in sbr/configs/, or else the
Hugging Face cache (or hub). The memory plan (sbr/memory.py) needs nothing more.

sbr/configs/<org>--<name>.json are the published config.json files of those models, field by field
(nothing added, nothing dropped), read through the model type's config class as transformers would.
Where the values came from (public copies, checked against each other and against the published
parameter counts, which tests/test_memory.py derives by hand from these files):
  Qwen/Qwen2-VL-2B-Instruct    PaddleMIX's Qwen2-VL test (model_name_or_path Qwen/Qwen2-VL-2B-Instruct, every
                               field); text fields again in Tongjilibo/bert4torch_config and in fine-tunes of
                               unsloth/Qwen2-VL-2B-Instruct on the hub; 2,208,985,600 parameters ("2.21B", tied)
  Qwen/Qwen2-VL-7B-Instruct    the same file's layout with the 7B's values: Qwen/Qwen2-VL-7B-Instruct-GPTQ-Int8's
                               and fine-tunes' config.json on the hub (_name_or_path the Qwen snapshot), the vision
                               tower's in menglc/DFN-Huge-Qwen2VL-7B, transformers' Qwen2VLConfig defaults (the 7B);
                               8,291,375,616 parameters (untied)
  Qwen/Qwen2.5-VL-3B-Instruct  a copy of the file with the model's printout and per-module counts (vision block
                               19,702,200, decoder layer 77,076,992); dahwinsingularity/vllm2 and UniGR-3B on the
                               hub (_name_or_path Qwen/Qwen2.5-VL-3B-Instruct); 3,754,622,976 parameters (tied)
  Qwen/Qwen2.5-VL-7B-Instruct  a README quoting Qwen/Qwen2.5-VL-7B-Instruct/config.json, TensorRT-LLM's Qwen2.5-VL
                               test (its layers cut for testing), Qwen/Qwen2.5-VL-7B-Instruct-AWQ's config.json;
                               8,292,166,656 parameters (untied)
  Qwen/Qwen3-VL-8B-Instruct    Qwen3-VL-4B-Instruct's config.json quoted field by field (DiffSynth's Qwen3-VL
                               encoder) for the layout, with the 8B's values from nvidia/Cosmos-Reason2-8B's
                               config.json (a Qwen3-VL-8B fine-tune, quoted in a public loader) and Qwen-Image-2.1's
                               Qwen3-VL-8B text encoder; 8,767,123,696 parameters ("8.77B", untied)
"""
import json
import os

from sbr.common import ConfigError

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SHIPPED = sorted(name[:-len(".json")].replace("--", "/") for name in os.listdir(CONFIGS) if name.endswith(".json"))


def published(model: str) -> bool:
    """Whether sbr ships the published config.json of hub id `model`."""
    return model in SHIPPED


def config_source(model: str) -> str:
    """Where load_config reads `model`'s configuration: "folder", "published" or "hub" (cache or network)."""
    if os.path.isfile(os.path.join(model, "config.json")):
        return "folder"
    return "published" if published(model) else "hub"


def load_config(model: str, trust_remote_code: bool = False):
    """`model`'s configuration: a folder's config.json (a folder is taken before a hub id of the same
    name, as transformers does), sbr's copy for a shipped hub id (no network: works with HF_HUB_OFFLINE=1
    and an empty cache), else AutoConfig from the cache or the hub."""
    from transformers import CONFIG_MAPPING, AutoConfig
    source = config_source(model)
    if source == "published":
        with open(os.path.join(CONFIGS, model.replace("/", "--") + ".json")) as f:
            values = json.load(f)
        return CONFIG_MAPPING[values["model_type"]].from_dict(values)
    parts = model.split("/")
    if source != "folder" and (len(parts) != 2 or model.startswith((".", "/", "~")) or os.path.isdir(parts[0])):
        raise ConfigError(f"--model {model}: no such folder, and not a hub id like Qwen/Qwen2-VL-7B-Instruct. Give a "
                          f"folder holding its config.json (the weights are not needed to plan), or one of the "
                          f"published configurations sbr ships: {', '.join(SHIPPED)}")
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {model}: no configuration found ({str(e).splitlines()[0]}). Give a folder holding "
                          f"its config.json (the weights are not needed to plan), or one of the published "
                          f"configurations sbr ships: {', '.join(SHIPPED)}") from e
