import os

import pytest
import torch

from sbr.collate import SampleDataset, VideoCollator
from sbr.data import Sample, load_seedbench
from sbr.model import load_processor
from sbr.prompt import build_messages


def item(i, n_frames, fps=2.0, size=252):
    g = torch.Generator().manual_seed(i)
    sample = Sample(sample_id=i, question=f"What next, question {i}?", options=["a", "b", "c", "d"], answer="A",
                    video=f"v{i}.mp4" if n_frames else None, image=f"i{i}.png")
    frames = torch.randint(0, 256, (n_frames, 3, size, size), dtype=torch.uint8, generator=g) if n_frames else None
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    return {"sample": sample, "frames": frames, "sample_fps": fps if n_frames else None, "image": image}


def hf_reference(processor, items):
    """What the model's own Hugging Face processor gives for the same frames, text and fps."""
    from transformers.video_utils import VideoMetadata
    texts = [processor.apply_chat_template(build_messages(x["sample"]), tokenize=False, add_generation_prompt=True)
             for x in items]
    videos = [x for x in items if x["frames"] is not None]
    kwargs = {}
    if videos:
        kwargs["videos"] = [x["frames"] for x in videos]
        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(x["frames"]), fps=x["sample_fps"],
                                                  frames_indices=list(range(len(x["frames"])))) for x in videos]
    return processor(text=texts, images=[x["image"] for x in items], padding=True, padding_side="left",
                     return_tensors="pt", **kwargs)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_pixels_grids_and_ids_equal_the_hf_processor(tiny, family):
    processor = load_processor(os.path.join(tiny, family))
    # a mixed batch: 16 frames, no progress video, 4 frames at another rate, an odd count (padded)
    items = [item(0, 16), item(1, 0), item(2, 4, fps=1.6), item(3, 5, fps=0.5)]
    ours = VideoCollator(processor)(items)
    ref = hf_reference(processor, items)
    expected_keys = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                     "pixel_values_videos", "video_grid_thw"} | ({"second_per_grid_ts"} if family == "qwen2_5_vl" else set())
    assert set(ref.keys()) == expected_keys and expected_keys <= set(ours)
    for k in expected_keys:
        assert torch.equal(ours[k], torch.as_tensor(ref[k])), k          # bit-exact, not merely close
    assert ours["video_grid_thw"].tolist() == [[8, 18, 18], [2, 18, 18], [3, 18, 18]]
    if family == "qwen2_5_vl":
        assert ours["second_per_grid_ts"].tolist() == pytest.approx([1.0, 1.25, 4.0])


def test_qwen3_vl_timestamps_pixels_and_ids_equal_the_original_processor(tiny):
    """Qwen3-VL at 256x256: pixels, grids and type ids bit for bit the Hugging Face processor's on the same
    frames, each frame pair's timestamp from the frames' indices and the clip's fps; the ids are the
    processor's without the template's outer <|vision_start|> ... <|vision_end|> around the frame blocks,
    which transformers 5.24 leaves and the original (4.57) processor replaces (sbr/collate.py)."""
    from transformers.video_utils import VideoMetadata
    processor = load_processor(os.path.join(tiny, "qwen3_vl"))
    items = [item(0, 16, size=256), item(1, 0, size=256), item(3, 5, fps=0.5, size=256)]
    clips = {0: ([0, 15, 30, 45, 60, 75, 90, 105, 120, 135, 150, 165, 180, 195, 210, 225], 30.0), 3: ([0, 4, 8, 12, 16], 2.5)}
    from sbr.family import timestamps
    for x in items:
        if x["frames"] is not None:
            x["seconds"] = timestamps(*clips[x["sample"].sample_id])
    assert items[2]["seconds"] == [0.8, 4.0, 6.4]          # (0 + 4) / 2 / 2.5, (8 + 12) / 2 / 2.5, (16 + 16) / 2 / 2.5
    ours = VideoCollator(processor, frame_size=256)(items)
    texts = [processor.apply_chat_template(build_messages(x["sample"]), tokenize=False, add_generation_prompt=True)
             for x in items]
    videos = [x for x in items if x["frames"] is not None]
    ref = processor(text=texts, images=[x["image"] for x in items], videos=[x["frames"] for x in videos],
                    video_metadata=[VideoMetadata(total_num_frames=1000, fps=clips[x["sample"].sample_id][1],
                                                  frames_indices=clips[x["sample"].sample_id][0]) for x in videos],
                    padding=True, padding_side="left", return_tensors="pt")
    assert "second_per_grid_ts" not in ours
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(ours[k], ref[k]), k
    assert ours["video_grid_thw"].tolist() == [[8, 16, 16], [3, 16, 16]]     # 8 x 8 merged tokens a pair
    tok = processor.tokenizer
    start, end = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    for b in range(len(items)):
        mine = ours["input_ids"][b][ours["attention_mask"][b].bool()].tolist()
        theirs = ref["input_ids"][b][ref["attention_mask"][b].bool()].tolist()
        types = ref["mm_token_type_ids"][b][ref["attention_mask"][b].bool()].tolist()
        if items[b]["frames"] is not None:
            outer = theirs.index(start)                  # the template's own: before the first timestamp
            closing = max(i for i, t in enumerate(theirs) if t == end and theirs[i - 1] == end)
            assert tok.decode(theirs[outer + 1:outer + 4]).startswith("<")
            theirs = theirs[:outer] + theirs[outer + 1:closing] + theirs[closing + 1:]
            types = types[:outer] + types[outer + 1:closing] + types[closing + 1:]
        assert mine == theirs, b
        assert ours["mm_token_type_ids"][b][ours["attention_mask"][b].bool()].tolist() == types
    text = tok.decode(ours["input_ids"][0])
    assert text.count("seconds>") == 8 and "<0.2 seconds><|vision_start|><|video_pad|>" in text
    assert "<7.2 seconds>" in text and "<|vision_start|><0" not in text      # (210 + 225) / 2 / 30 = 7.25 -> 7.2


def test_token_counts_padding_and_type_ids(processor):
    collator = VideoCollator(processor)
    batch = collator([item(0, 16), item(1, 0)])
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    video, image = collator.video_token_id, collator.image_token_id
    assert (ids[0] == video).sum() == 648 and (ids[0] == image).sum() == 81    # 8 x 81 and 81
    assert (ids[1] == video).sum() == 0 and (ids[1] == image).sum() == 81
    pad = int((mask[1] == 0).sum())                   # the video and its <|vision_start|> <|vision_end|>
    assert pad == 648 + 2 and mask[1, :pad].sum() == 0 and (ids[1, :pad] == processor.tokenizer.pad_token_id).all()
    assert torch.equal(types == 2, ids == video) and torch.equal(types == 1, ids == image)
    right = VideoCollator(processor, padding_side="right")([item(0, 16), item(1, 0)])
    assert right["attention_mask"][1, -pad:].sum() == 0 and right["attention_mask"][1, :-pad].all()


def test_no_video_in_the_whole_batch(processor):
    batch = VideoCollator(processor)([item(1, 0)])
    assert "pixel_values_videos" not in batch and batch["pixel_values"].shape == (324, 3 * 2 * 14 * 14)


def test_dataloader_workers_give_the_same_batches(tiny, processor):
    root = os.path.join(tiny, "data")
    samples = load_seedbench(os.path.join(root, "annotations", "validation_L1.jsonl"), root)
    collator = VideoCollator(processor)
    direct = collator([collator.load(s) for s in samples[:4]])
    loader = torch.utils.data.DataLoader(SampleDataset(samples[:4], collator), batch_size=4, num_workers=2,
                                         collate_fn=collator)
    [batch] = list(loader)
    assert batch["samples"] == samples[:4]
    for k, v in direct.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, batch[k]), k
