"""Frames and the observation image, as the authors fed them to Qwen2-VL.

Sampling (the authors' release, after qwen-vl-utils' `smart_nframes`): 2 fps over the whole pre-cut
clip, clamped to [4, 16] and to the clip's length, floored to an even number (Qwen2-VL's temporal
patch is 2); indices `linspace(0, n_total - 1, n).round()`. Every frame and the image are resized to
252x252 (the authors ask for 256 and Qwen2-VL rounds to a multiple of 28; Qwen3-VL's 32-pixel tiles
take 256 as it is, its family's default, sbr/family.py), ignoring the aspect ratio,
bicubic with antialiasing. Works inside DataLoader workers (decord, one thread per reader).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 252


class VideoError(RuntimeError):
    """A video or image that cannot be read; the message names the file (also in `.path`)."""
    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


@dataclass
class Clip:
    frames: torch.Tensor   # (T, 3, H, W) uint8
    sample_fps: float      # n / n_total * video_fps: the rate the frames were taken at
    total_frames: int
    video_fps: float
    indices: list[int]     # which frames of the file (Qwen3-VL's timestamps: index / video_fps)


def frame_indices(total_frames: int, video_fps: float, *, fps: float = 2.0, min_frames: int = 4,
                  max_frames: int = 16) -> list[int]:
    """n = clamp(total / video_fps * fps, min_frames, min(max_frames, total)), floored to even.
    A clip shorter than 2 frames repeats its frame so the temporal patch of 2 is filled."""
    if total_frames < 1 or not video_fps > 0:
        raise ValueError(f"need at least one frame and a positive fps, got {total_frames} frames at {video_fps} fps")
    n = total_frames / video_fps * fps
    n = min(max(n, min_frames), max_frames, total_frames)
    n = max(2, math.floor(n / 2) * 2)
    # float32 linspace then round-half-even, exactly as torch computes it in the authors' code
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def resize(frames: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, size, size) uint8, bicubic with antialiasing, aspect ratio ignored."""
    if frames.shape[-2:] == (size, size):
        return frames
    out = F.interpolate(frames.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def read_video(path: str, *, size: int = SIZE, fps: float = 2.0, min_frames: int = 4,
               max_frames: int = 16) -> Clip:
    import decord
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total, video_fps = len(reader), float(reader.get_avg_fps())
        indices = frame_indices(total, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
        array = reader.get_batch(indices).asnumpy()                       # (T, H, W, 3) uint8
    except Exception as e:  # decord raises its own DECORDError, or RuntimeError, on bad files
        raise VideoError(f"{path}: cannot read video ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                         path) from e
    frames = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)   # (T, 3, H, W)
    return Clip(resize(frames, size), len(indices) / total * video_fps, total, video_fps, indices)


def load_frames(path: str) -> torch.Tensor:
    """The sampled, resized frames of one clip: uint8 (T, 3, 252, 252), T even, 4 <= T <= 16 when the clip allows."""
    return read_video(path).frames


def load_image(path: str, *, size: int = SIZE) -> torch.Tensor:
    """The current observation: uint8 (3, size, size), RGB."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as e:
        raise VideoError(f"{path}: cannot read image ({type(e).__name__}: {e})", path) from e
    return resize(torch.from_numpy(array.copy()).permute(2, 0, 1)[None], size)[0]
