"""Loading a model of a family in sbr/family.py (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and its processor from a Hugging Face folder or hub id.

Weights come as safetensors through `from_pretrained`; remote code runs only when the user passes
`trust_remote_code=True` (a CLI flag), never by default.
"""
import torch

from sbr.common import ConfigError, attn_implementation
from sbr.family import SUPPORTED
from sbr.positions import install_positions

VISUAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Where a completion ends: the eos ids of Qwen2-VL-7B-Instruct's generation config (151645, 151643),
# at which the authors' rollouts stopped.
STOP_TOKENS = ["<|im_end|>", "<|endoftext|>"]


def load_processor(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if processor.tokenizer.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no pad token")
    return processor


def load_model(path: str, *, dtype: torch.dtype = torch.float32, device="cpu", attn: str | None = None,
               trust_remote_code: bool = False):
    """The model with sbr's mRoPE positions installed (sbr/positions.py), so that rollouts, training
    forwards and `generate()` all place tokens the way the original Qwen code does."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type not in SUPPORTED and not trust_remote_code:
        raise ConfigError(f"--model {path}: model_type {config.model_type!r} is not one of {SUPPORTED} "
                          "(--trust_remote_code true lets a folder's own code run)")
    from safetensors import SafetensorError
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=attn or attn_implementation(dtype), use_safetensors=True,
            trust_remote_code=trust_remote_code)
    except SafetensorError as e:
        raise unreadable_weights(path, e) from None
    if config.model_type in SUPPORTED:
        install_positions(model)
    return model.to(device)


def unreadable_weights(path: str, error: Exception) -> ConfigError:
    return ConfigError(f"--model {path}: its weights cannot be read ({error}): a file is truncated or damaged; "
                       "export or download the model again")


def visual_token_ids(tokenizer) -> list[int]:
    """Ids that a sampled completion must never contain: they would break the next forward
    ("image features and image tokens do not match"). Suppressed when decoding."""
    return [tokenizer.convert_tokens_to_ids(t) for t in VISUAL_TOKENS]


def token_ids(tokenizer, tokens: list[str], flag: str) -> list[int]:
    """Ids of whole tokens (e.g. STOP_TOKENS); one the tokenizer lacks is an error naming the flag."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing or not tokens:
        raise ConfigError(f"--{flag}: {missing or 'nothing'} is not a token of this tokenizer")
    return [vocab[t] for t in tokens]
