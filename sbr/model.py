"""Loading a Qwen2-VL-family model and its processor from a Hugging Face folder or hub id.

Weights come as safetensors through `from_pretrained`; remote code runs only when the user passes
`trust_remote_code=True` (a CLI flag), never by default.
"""
import torch

from sbr.common import attn_implementation

SUPPORTED = ("qwen2_vl", "qwen2_5_vl")
VISUAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def load_processor(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if processor.tokenizer.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no pad token")
    return processor


def load_model(path: str, *, dtype: torch.dtype = torch.float32, device="cpu", attn: str | None = None,
               trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type not in SUPPORTED and not trust_remote_code:
        raise ValueError(f"{path}: model_type {config.model_type!r} is not one of {SUPPORTED}")
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=attn or attn_implementation(), use_safetensors=True,
        trust_remote_code=trust_remote_code)
    return model.to(device)


def visual_token_ids(tokenizer) -> list[int]:
    """Ids that a sampled completion must never contain: they would break the next forward
    ("image features and image tokens do not match"). Suppressed when decoding."""
    return [tokenizer.convert_tokens_to_ids(t) for t in VISUAL_TOKENS]
