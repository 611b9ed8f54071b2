"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL multimodal RoPE positions, computed the way the original Qwen code does.

Each token gets three position ids (temporal, height, width). Text tokens carry the same id on all
three axes, counting on by one. A visual block of merged grid (gt, gh, gw) starting at s gets
    temporal  s + floor(k · τ)   for frame-group k = 0..gt-1,   τ = tokens_per_second · second_per_grid_t
                                 (Qwen2.5-VL videos; fp32 arithmetic as in the original: (k · spg) · tps)
              s + k              (Qwen2-VL, and every image: τ = 1, one frame-group)
    height    s + i,  width  s + j
and the text after the block starts at (largest id of the block on any axis) + 1.
Qwen3-VL (`split_video`): each frame pair of a video is its own block behind its text timestamp
(sbr/collate.py), so a video grid (gt, gh, gw) is gt grids (1, gh, gw), each placed as an image is:
temporal s, height s + i, width s + j, the next text at s + max(gh, gw). Its original code (and
transformers 5.24's, which splits the grids the same way) gives exactly this; the temporal axis carries
no time, the timestamps' text does.

Why sbr computes this itself: transformers 5.24's `get_rope_index` starts the text after a block at
s + max(gh, gw), ignoring the temporal axis. That is the same for images (gt = 1), but not for a
video whose temporal ids run past max(gh, gw) - 1: Qwen2.5-VL with 16 frames at 2.5 s per grid
(τ = 5) reaches s + 35 while 5.24 continues at s + 9, so the observation image and the question
would overlap the video's positions; Qwen2-VL likewise once gt > max(gh, gw) (small frames). The
original Qwen2-VL / Qwen2.5-VL code in transformers 4.x, and vLLM, continue at the maximum + 1;
the released weights were trained that way. `install_positions` makes a loaded model use this
function everywhere (sbr's rollouts and training forwards call `get_rope_index`, and so does
`generate()`), so training, evaluation and other engines see the same positions.

Padding (left or right, from `attention_mask`) gets position 0 and is never attended to; `deltas`
(B, 1) is what decoding adds to a plain text position: (next id) - (unpadded length).
"""
import torch

from sbr.family import of_config


def rope_index(input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               *, image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
               second_per_grid_ts: torch.Tensor | None = None, spatial_merge_size: int = 2,
               tokens_per_second: float | None = None, split_video: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, mm_token_type_ids (0 text, 1 image, 2 video), attention_mask: (B, P). Grids (n, 3)
    in patches, in order of appearance over the batch. `tokens_per_second` None = Qwen2-VL (no time
    scaling); `split_video` = Qwen3-VL (a block a frame pair). Returns positions (3, B, P) long and
    deltas (B, 1) long."""
    if split_video and video_grid_thw is not None:
        video_grid_thw = video_grid_thw.repeat_interleave(video_grid_thw[:, 0], dim=0)
        video_grid_thw = torch.cat([torch.ones_like(video_grid_thw[:, :1]), video_grid_thw[:, 1:]], dim=1)
    if second_per_grid_ts is not None and second_per_grid_ts.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"second_per_grid_ts arrived as {second_per_grid_ts.dtype}: positions need it in fp32 "
                         "(bf16 moves 1.07 s to 1.0703125 s and shifts temporal positions)")
    B, P = input_ids.shape
    device = input_ids.device
    grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             2: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
    seconds = iter(second_per_grid_ts.float().tolist() if second_per_grid_ts is not None else [])
    keep = attention_mask.bool() if attention_mask is not None else torch.ones(B, P, dtype=torch.bool, device=device)
    positions = torch.zeros(3, B, P, dtype=torch.long)
    deltas = []
    for b in range(B):
        types = mm_token_type_ids[b][keep[b]].tolist()
        blocks, start, i = [], 0, 0
        while i < len(types):
            kind = types[i]
            if kind == 0:
                j = i
                while j < len(types) and types[j] == 0:
                    j += 1
                block = torch.arange(j - i).expand(3, -1) + start                    # (3, n) text
            else:
                grid = next(grids[kind], None)
                if grid is None:
                    raise ValueError(f"row {b}: more {'image' if kind == 1 else 'video'} tokens than grids")
                gt, gh, gw = grid[0], grid[1] // spatial_merge_size, grid[2] // spatial_merge_size
                j = i + gt * gh * gw
                if types[i:j] != [kind] * (gt * gh * gw):
                    raise ValueError(f"row {b}: a grid of {gt}x{gh}x{gw} merged tokens does not match the "
                                     f"token types at {i}..{j}")
                if kind == 2 and tokens_per_second is not None:
                    spg = next(seconds, 1.0)
                    t = (torch.arange(gt, dtype=torch.float32) * spg * tokens_per_second).long()   # (gt,)
                else:
                    t = torch.arange(gt)
                tt, hh, ww = torch.meshgrid(t, torch.arange(gh), torch.arange(gw), indexing="ij")
                block = torch.stack([tt, hh, ww]).reshape(3, -1) + start              # (3, gt*gh*gw)
            blocks.append(block)
            start = int(block.max()) + 1                                               # max over all axes, + 1
            i = j
        if blocks:
            positions[:, b, keep[b].cpu()] = torch.cat(blocks, dim=1)
        deltas.append(start - len(types))
    return positions.to(device), torch.tensor(deltas, dtype=torch.long, device=device)[:, None]


def install_positions(model) -> None:
    """Make a loaded model of a family in sbr/family.py (`...ForConditionalGeneration`) compute its mRoPE
    positions with `rope_index`: its inner model's `get_rope_index` is what transformers' forward and
    generate() call, and what sbr's Policy calls."""
    config = model.config
    merge = config.vision_config.spatial_merge_size
    time = of_config(config).video_time
    tps = getattr(config.vision_config, "tokens_per_second", None) if time == "seconds" else None

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, **_):
        if mm_token_type_ids is None:
            raise ValueError("mm_token_type_ids is required to place image and video tokens")
        return rope_index(input_ids, mm_token_type_ids, attention_mask, image_grid_thw=image_grid_thw,
                          video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                          spatial_merge_size=merge, tokens_per_second=tps, split_video=time == "timestamps")
    model.model.get_rope_index = get_rope_index
