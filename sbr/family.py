"""What differs between the model families sbr runs, in one table. A new family is one more entry here,
its tiny builder in sbr/tiny.py and its published config in sbr/configs/; everything else reads these
fields or the model's own modules (sbr/decode.py applies q/k norms where a layer has them, and the
DeepStack features reach the decoder wherever the vision tower returns them, sbr/policy.py).

How a video's time reaches the model (`video_time`):
  "index"       Qwen2-VL: temporal position = the frame pair's index k
  "seconds"     Qwen2.5-VL: temporal position = floor(k * second_per_grid_t * tokens_per_second),
                second_per_grid_t = temporal_patch / sample_fps, an input of the model
  "timestamps"  Qwen3-VL: each frame pair is its own block `<t seconds><|vision_start|>...<|vision_end|>`,
                t the mean time of its two frames (frame index / the clip's fps) printed with one
                decimal, and every block a grid with t = 1 (its temporal position is its start)

Frames are squares of `frame_size` pixels, a multiple of patch x merge: 28 for 14-pixel patches
(the authors' 252 = 9 x 28), 32 for Qwen3-VL's 16-pixel ones (252 is not; 256 = 8 x 32 gives 8 x 8
merged tokens a frame pair, as 252 gives 9 x 9).

A next candidate, Qwen3.5 (hybrid: Gated DeltaNet linear-attention layers between full-attention
ones), needs more than an entry: its linear layers keep a recurrent state (a d_k x d_v matrix a head)
and a short convolution window instead of K/V, so sbr/decode.py's shared-prefix cache would hold, for
those layers, the prompt's final state once a question and copy it into each of its G rows (the
state is updated in place per row: not shared after the first token), and the group-shared training
forward (sbr/policy.py) would need the same state handed from the prompt pass to the completions.
"""
from dataclasses import dataclass

from sbr.common import ConfigError


@dataclass(frozen=True)
class Family:
    model_type: str           # config.model_type
    processor: str            # the Hugging Face processor's class name
    video_time: str           # "index" | "seconds" | "timestamps" (above)
    frame_size: int           # the default frame side, pixels
    multiple: int             # frame sides must be multiples of this: patch x merge


FAMILIES = {f.model_type: f for f in (
    Family("qwen2_vl", "Qwen2VLProcessor", "index", 252, 28),
    Family("qwen2_5_vl", "Qwen2_5_VLProcessor", "seconds", 252, 28),
    Family("qwen3_vl", "Qwen3VLProcessor", "timestamps", 256, 32),
)}
SUPPORTED = tuple(FAMILIES)


def of_config(config) -> Family:
    """The family of a model's config (a remote-code model sbr does not know: Qwen2-VL's rules)."""
    return FAMILIES.get(config.model_type, FAMILIES["qwen2_vl"])


def of_processor(processor) -> Family:
    """The family a Hugging Face processor belongs to, by its class or a class it derives from (a remote-code
    processor built on Qwen3VLProcessor writes timestamps as Qwen3-VL's does)."""
    names = [c.__name__ for c in type(processor).__mro__]
    for family in FAMILIES.values():
        if family.processor in names:
            return family
    return FAMILIES["qwen2_vl"]


def frame_size(requested: int, family: Family, flag: str = "--frame_size") -> int:
    """The frame side to use: the family's default for 0, else `requested` if the family's patches tile
    it; otherwise a ConfigError naming the nearest sizes that do."""
    if requested == 0:
        return family.frame_size
    if requested % family.multiple:
        below = requested // family.multiple * family.multiple
        raise ConfigError(f"{flag} {requested}: {family.model_type} frames must be multiples of {family.multiple} "
                          f"pixels (patch x merge); use {below or family.multiple} or {below + family.multiple}")
    return requested


def timestamps(indices: list[int], video_fps: float, temporal_patch: int = 2) -> list[float]:
    """Qwen3-VL's time of each frame group: the mean of its first and last frame's time, index / fps,
    the last index repeated to fill the last group (as the clip's last frame is, sbr.collate)."""
    indices = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch)
    seconds = [i / video_fps for i in indices]
    return [(seconds[k] + seconds[k + temporal_patch - 1]) / 2 for k in range(0, len(seconds), temporal_patch)]


def resolve_frame_size(requested: int, model: str, trust_remote_code: bool = False) -> int:
    """--frame_size for `model` (a folder or hub id): 0 becomes its family's default; a size its patches do
    not tile is a ConfigError naming the flag and the nearest valid sizes. Reads only the configuration."""
    from sbr.published import load_config
    return frame_size(requested, of_config(load_config(model, trust_remote_code)))


def check_frame_size(cfg) -> None:
    """--frame_size against the model's family before anything loads, where its configuration is at hand
    (a folder, a shipped config, the cache; no --model is the tiny default, a Qwen2-VL). Others are
    checked by resolve_frame_size once the model is there."""
    if not cfg.frame_size:
        return
    if not cfg.model:
        frame_size(cfg.frame_size, FAMILIES["qwen2_vl"])
        return
    from sbr.published import load_config
    try:
        config = load_config(cfg.model, getattr(cfg, "trust_remote_code", False))
    except ConfigError:
        return                                  # the model's own check names what is wrong with it
    frame_size(cfg.frame_size, of_config(config))
