r"""mRoPE positions against hand-derived examples, the original Qwen algorithm (sbr/positions.py).

Example A, Qwen2.5-VL (tokens_per_second 2): 2 text tokens, a video of grid (4, 4, 4) patches = (4, 2, 2)
merged = 16 tokens at 2.5 s per grid (τ = 2 · 2.5 = 5), then 3 text tokens.
    text 0, 1
    video, s = 2:  temporal 2 + floor(k · 5) = 2, 7, 12, 17 (each over the 2x2 grid)
                   height 2, 2, 3, 3 ... ; width 2, 3, 2, 3 ...
    text after: max over all axes = 17, so 18, 19, 20;  delta = 21 - 21 = 0
  transformers 5.24 continues at s + max(gh, gw) = 2 + 2 = 4: text 4, 5, 6 (inside the video's span).
Example B, Qwen2-VL (no time scaling): 1 text token, a video (8, 4, 4) -> (8, 2, 2) = 32 tokens,
2 text tokens, an image (1, 4, 4) -> 4 tokens, 1 text token.
    text 0;  video s = 1: temporal 1..8, height/width 1..2  -> next 9
    text 9, 10;  image s = 11: temporal 11, height/width 11..12 -> next 13
    text 13;  delta = 14 - 40 = -26
  transformers 5.24: text after the video at 1 + 2 = 3 (the video's temporal axis reaches 8).
Example C, Qwen3-VL (split_video), behind 2 pads: 2 text tokens, then a video of grid (2, 4, 4) written
as two timestamped frame-pair blocks (`<t seconds>` as 3 text tokens and <|vision_start|>, 4 video
tokens, <|vision_end|>), an image (1, 4, 4) in its start/end, 1 text token:
    text 0..5 (2 + 3 + 1);  pair 1, s = 6: temporal 6, height/width 6..7 -> next 6 + max(2, 2) = 8
    text 8..12 (end, 3, start);  pair 2, s = 13: temporal 13, height/width 13..14 -> next 15
    text 15, 16 (end, start);  image s = 17: temporal 17, height/width 17..18 -> next 19
    text 19, 20 (end, 1 text);  27 tokens: delta = 21 - 27 = -6
"""
import os

import pytest
import torch

from sbr.positions import rope_index


def video_block(start, gt, gh, gw, times):
    t = torch.tensor(times).repeat_interleave(gh * gw) + start
    h = torch.arange(gh).repeat_interleave(gw).repeat(gt) + start
    w = torch.arange(gw).repeat(gt * gh) + start
    return torch.stack([t, h, w])


def text(start, n):
    return (torch.arange(n) + start).expand(3, -1)


EXAMPLE_A = torch.cat([text(0, 2), video_block(2, 4, 2, 2, [0, 5, 10, 15]), text(18, 3)], dim=1)   # (3, 21)
TYPES_A = torch.tensor([[0, 0] + [2] * 16 + [0, 0, 0]])


def test_qwen2_5_video_then_text_by_hand():
    pos, delta = rope_index(torch.zeros_like(TYPES_A), TYPES_A, video_grid_thw=torch.tensor([[4, 4, 4]]),
                            second_per_grid_ts=torch.tensor([2.5]), tokens_per_second=2)
    assert torch.equal(pos[:, 0], EXAMPLE_A) and delta.tolist() == [[0]]
    assert pos[:, 0, 18].tolist() == [18, 18, 18]          # transformers 5.24 would put this token at 4


def test_qwen2_video_image_text_by_hand():
    types = torch.tensor([[0] + [2] * 32 + [0, 0] + [1] * 4 + [0]])
    pos, delta = rope_index(torch.zeros_like(types), types, video_grid_thw=torch.tensor([[8, 4, 4]]),
                            image_grid_thw=torch.tensor([[1, 4, 4]]))
    expected = torch.cat([text(0, 1), video_block(1, 8, 2, 2, list(range(8))), text(9, 2),
                          video_block(11, 1, 2, 2, [0]), text(13, 1)], dim=1)
    assert torch.equal(pos[:, 0], expected) and delta.tolist() == [[-26]]


def test_qwen3_timestamped_video_image_text_left_padded_by_hand():
    types = torch.tensor([[0, 0] + [0] * 4 + [2] * 4 + [0] * 5 + [2] * 4 + [0] * 2 + [1] * 4 + [0] * 2])
    types = torch.cat([torch.zeros(1, 2, dtype=torch.long), types], dim=1)
    mask = torch.ones_like(types)
    mask[0, :2] = 0
    pos, delta = rope_index(torch.zeros_like(types), types, mask, video_grid_thw=torch.tensor([[2, 4, 4]]),
                            image_grid_thw=torch.tensor([[1, 4, 4]]), split_video=True)
    expected = torch.cat([text(0, 6), video_block(6, 1, 2, 2, [0]), text(8, 5), video_block(13, 1, 2, 2, [0]),
                          text(15, 2), video_block(17, 1, 2, 2, [0]), text(19, 2)], dim=1)
    assert torch.equal(pos[:, 0, 2:], expected) and not pos[:, 0, :2].any() and delta.tolist() == [[-6]]
    with pytest.raises(ValueError, match="grid"):             # unsplit, the first block would claim 8 tokens
        rope_index(torch.zeros_like(types), types, mask, video_grid_thw=torch.tensor([[2, 4, 4]]),
                   image_grid_thw=torch.tensor([[1, 4, 4]]))


def test_left_padding_and_batch_grids_in_order():
    """Row 0 = example A behind 3 pads (position 0, never attended); row 1 text only: 0..23, delta 0."""
    types = torch.cat([torch.zeros(1, 3, dtype=torch.long), TYPES_A], dim=1)
    types = torch.cat([types, torch.zeros(1, 24, dtype=torch.long)])
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :3] = 0
    pos, delta = rope_index(torch.zeros_like(types), types, mask, video_grid_thw=torch.tensor([[4, 4, 4]]),
                            second_per_grid_ts=torch.tensor([2.5]), tokens_per_second=2)
    assert torch.equal(pos[:, 0, 3:], EXAMPLE_A) and not pos[:, 0, :3].any()
    assert torch.equal(pos[:, 1], text(0, 24)) and delta.tolist() == [[0], [0]]


def test_fp32_seconds_only():
    """bf16 rounds 0.999 s to 1.0: k = 7 would land at floor(14.0) = 14 instead of floor(13.986) = 13."""
    kw = dict(video_grid_thw=torch.tensor([[8, 4, 4]]), tokens_per_second=2)
    types = torch.tensor([[0] + [2] * 32 + [0]])
    pos, _ = rope_index(torch.zeros_like(types), types, second_per_grid_ts=torch.tensor([0.999]), **kw)
    assert pos[0, 0, 1 + 7 * 4].item() == 1 + 13
    with pytest.raises(ValueError, match="fp32"):
        rope_index(torch.zeros_like(types), types, second_per_grid_ts=torch.tensor([0.999], dtype=torch.bfloat16), **kw)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_loaded_models_use_it_and_agree_with_transformers_where_it_is_right(tiny, family):
    """`load_model` installs sbr's positions. On the tiny batch (images, and clips of up to 12 s) they
    equal transformers' own for Qwen2-VL (gt = 8 <= max(gh, gw) = 9 at 252x252: no disagreement) and
    Qwen3-VL (a block a frame pair, t = 1) and differ for Qwen2.5-VL, whose 12 s clip spans temporal ids
    0..21 > 9."""
    from sbr.collate import VideoCollator, model_inputs
    from sbr.data import load_seedbench
    from sbr.model import load_model, load_processor
    processor, model = load_processor(os.path.join(tiny, family)), load_model(os.path.join(tiny, family))
    root = os.path.join(tiny, "data")
    samples = load_seedbench(os.path.join(root, "annotations", "validation_L1.jsonl"), root)
    collator = VideoCollator(processor, frame_size=256 if family == "qwen3_vl" else 252)
    inputs = model_inputs(collator([collator.load(s) for s in samples]))
    kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask",
                                 "mm_token_type_ids") if k in inputs}
    ours = model.model.get_rope_index(inputs["input_ids"], **kw)
    theirs = type(model.model).get_rope_index(model.model, inputs["input_ids"], **kw)
    tps = model.config.vision_config.tokens_per_second if family == "qwen2_5_vl" else None
    expected = rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["attention_mask"],
                          image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"],
                          second_per_grid_ts=inputs.get("second_per_grid_ts"), tokens_per_second=tps,
                          split_video=family == "qwen3_vl")
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))
    same = all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert same == (family != "qwen2_5_vl")
