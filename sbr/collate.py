"""Samples -> Qwen2-VL / Qwen2.5-VL / Qwen3-VL model inputs, without the Hugging Face processor in the hot path.

Two halves, so decoding can run in DataLoader workers:
  `VideoCollator.load(sample)`   decode the clip and the image (decord, uint8 252x252): the slow part.
  `VideoCollator(items)`         normalise, patchify, build the chat text, expand the visual
                                 placeholders, pad on the left, stack.

The pixels follow the model's own processor exactly (a test compares them): with r the rescale factor,
m and s the processor's mean and std,
    x' = (x - m / r) / (s / r)                   (its fused rescale-and-normalise, float32)
then the clip (T frames; T padded to a multiple of the temporal patch tp by repeating the last frame)
is cut into patches of tp x p x p, ordered so that each 2x2 merge group is contiguous:
    (gt tp) c (hb m1 p1) (wb m2 p2) -> (gt hb wb m1 m2) (c tp p1 p2)
An image is the same with its one frame repeated tp times. One clip of 16 frames at 252x252 gives a
grid (8, 18, 18): 8 * 18 * 18 / 2^2 = 648 video tokens; the image (1, 18, 18) gives 81.

Qwen3-VL (sbr/family.py, video_time "timestamps") writes each frame pair as its own block: the chat
template's `<|vision_start|><|video_pad|><|vision_end|>` becomes, for pairs k = 0..gt-1,
    <t_k seconds><|vision_start|><|video_pad|> x (gh gw / 4)<|vision_end|>
with t_k the mean time of the pair's two frames (their indices in the file over its fps) to one decimal.
That is the original Qwen3-VL processor's rule (transformers 4.57, which the released models were
published with, and vLLM's): it replaces the template's whole block. transformers 5.24 replaces only the
`<|video_pad|>`, leaving the template's `<|vision_start|>` and `<|vision_end|>` around the frame blocks,
one level of nesting the model never saw in training; the parity test checks that this outer pair is
the only difference.

Unlike the Hugging Face video processor (whose default min_pixels of 128*28*28 would upscale 252x252
frames to 336x336), nothing here resizes: frames arrive at the authors' 252x252 (Qwen3-VL: 256x256, the
size the authors asked for, which its 32-pixel tiles take as it is).
"""
import random

import torch
from einops import rearrange

from sbr.data import ChatSample, DataError, Sample
from sbr.family import frame_size as valid_frame_size, of_processor, timestamps
from sbr.prompt import build_messages
from sbr.video import VideoError, load_image, read_video

class VideoCollator:
    def __init__(self, processor, *, padding_side: str = "left", max_frames: int = 16, fps: float = 2.0,
                 frame_size: int = 0):
        ip = processor.image_processor
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.patch, self.merge, self.tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        # the processor's fused form: mean and std divided by the rescale factor (see module docstring)
        self.mean = torch.tensor(ip.image_mean) * (1.0 / ip.rescale_factor)
        self.std = torch.tensor(ip.image_std) * (1.0 / ip.rescale_factor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.video_token_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.pad_token_id = self.tokenizer.pad_token_id
        # how the video's time reaches the model (sbr/family.py): Qwen2.5-VL needs second_per_grid_ts =
        # tp / sample_fps; Qwen3-VL, a timestamp before each frame pair's block
        family = of_processor(processor)
        self.video_time = family.video_time
        # frame_size 0: the family's (252, or 256 for Qwen3-VL's 16-pixel patches); else a multiple of patch x merge
        self.frame_size = valid_frame_size(frame_size, family)
        self.padding_side, self.max_frames, self.fps = padding_side, max_frames, fps

    # ------------------------------------------------------------------ worker side
    def load(self, sample: Sample) -> dict:
        """Decode one sample's media: the part that belongs in DataLoader workers. An unreadable file
        is a DataError naming the annotation file, line and field as well as the media file."""
        item = {"sample": sample, "frames": None, "sample_fps": None, "image": None, "seconds": None}
        try:
            if sample.video is not None:
                clip = read_video(sample.video, max_frames=self.max_frames, fps=self.fps, size=self.frame_size)
                item["frames"], item["sample_fps"] = clip.frames, clip.sample_fps
                item["seconds"] = timestamps(clip.indices, clip.video_fps, self.tp)     # each frame pair's time
            if sample.image is not None:
                item["image"] = load_image(sample.image, size=self.frame_size)
        except VideoError as e:
            file, line, video_field, image_field = sample.source or ("(no annotation)", 0, "video", "image")
            raise DataError(file, line, video_field if e.path == sample.video else image_field, str(e)) from e
        return item

    # ------------------------------------------------------------------ pixels
    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(T, 3, H, W) uint8 -> patches (gt*gh*gw, 3*tp*p*p) float32 and the grid [gt, gh, gw]."""
        if pad := -frames.shape[0] % self.tp:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        x = (frames.float() - self.mean[:, None, None]) / self.std[:, None, None]   # (T, 3, H, W)
        p, m = self.patch, self.merge
        patches = rearrange(x, "(gt tp) c (hb m1 p1) (wb m2 p2) -> (gt hb wb m1 m2) (c tp p1 p2)",
                            tp=self.tp, m1=m, m2=m, p1=p, p2=p)
        t, _, h, w = x.shape
        return patches, [t // self.tp, h // p, w // p]

    def n_tokens(self, grid: list[int]) -> int:
        return grid[0] * grid[1] * grid[2] // self.merge ** 2

    # ------------------------------------------------------------------ text
    def prompt_ids(self, sample, seconds: list[float] | None = None) -> list[int]:
        """Chat-template ids of one sample's prompt, up to and including `<|im_start|>assistant\n`:
        the SEED-Bench-R1 prompt, or an SFT record's own messages. `seconds` (Qwen3-VL): the video's block
        becomes one timestamped block a frame pair, each with one `<|video_pad|>` for `expand`."""
        messages = sample.messages if isinstance(sample, ChatSample) else build_messages(sample)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if seconds is not None:
            block = "<|vision_start|><|video_pad|><|vision_end|>"
            if text.count(block) != 1:
                raise ValueError(f"sample {sample.sample_id}: the chat text has {text.count(block)} video blocks, "
                                 "expected one")
            text = text.replace(block, "".join(f"<{t:.1f} seconds>{block}" for t in seconds))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def response_ids(self, response: str) -> list[int]:
        """The tokens an SFT loss is taken on: the assistant's response and its end-of-turn token.
        Appended to `prompt_ids` (and a final newline) they give the chat template's full conversation."""
        return self.tokenizer(response + "<|im_end|>", add_special_tokens=False)["input_ids"]

    def expand(self, ids: list[int], n_video: int, n_image: int) -> list[int]:
        out = []
        for i in ids:
            if i == self.video_token_id:
                out.extend([i] * n_video)
            elif i == self.image_token_id:
                out.extend([i] * n_image)
            else:
                out.append(i)
        return out

    # ------------------------------------------------------------------ batch
    def __call__(self, items: list[dict]) -> dict:
        """Stack a batch of prompts. Each item comes from `load`. Returns the model's keyword arguments
        plus `samples`."""
        videos, video_grids, fps, images, image_grids, rows = [], [], [], [], [], []
        for item in items:
            n_video = n_image = per_pad = 0
            seconds = None
            if item["frames"] is not None:
                patches, grid = self.patchify(item["frames"])
                videos.append(patches), video_grids.append(grid), fps.append(item["sample_fps"])
                n_video = per_pad = self.n_tokens(grid)
                if self.video_time == "timestamps":          # one block, one pad, a frame pair
                    seconds = item.get("seconds")
                    if seconds is None or len(seconds) != grid[0]:
                        raise ValueError(f"sample {item['sample'].sample_id}: Qwen3-VL needs each frame pair's time "
                                         f"(VideoCollator.load's 'seconds'), got {seconds!r} for {grid[0]} pairs")
                    per_pad = n_video // grid[0]
            if item["image"] is not None:
                patches, grid = self.patchify(item["image"][None])
                images.append(patches), image_grids.append(grid)
                n_image = self.n_tokens(grid)
            ids = self.expand(self.prompt_ids(item["sample"], seconds), per_pad, n_image)
            if ids.count(self.video_token_id) != n_video or ids.count(self.image_token_id) != n_image:
                raise ValueError(f"sample {item['sample'].sample_id}: the chat text's media placeholders do not "
                                 "match its media (one video and one image at most)")
            rows.append(ids)
        batch = self.pad(rows)
        if videos:
            batch["pixel_values_videos"] = torch.cat(videos)
            batch["video_grid_thw"] = torch.tensor(video_grids)
            if self.video_time == "seconds":
                batch["second_per_grid_ts"] = torch.tensor([self.tp / f for f in fps])
        if images:
            batch["pixel_values"] = torch.cat(images)
            batch["image_grid_thw"] = torch.tensor(image_grids)
        batch["samples"] = [item["sample"] for item in items]
        return batch

    def pad(self, rows: list[list[int]]) -> dict:
        """Pad to the longest row (left for generation, right for training); type ids 1 image, 2 video."""
        input_ids, attention_mask = pad_rows(rows, self.pad_token_id, self.padding_side)
        mm_token_type_ids = torch.zeros_like(input_ids)
        mm_token_type_ids[input_ids == self.image_token_id] = 1
        mm_token_type_ids[input_ids == self.video_token_id] = 2
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}


def responses(collator, items, prompt_lengths, max_length, device):
    """Right-padded response ids (B, R) and their mask, each cut to fit max_length after its prompt.
    Returns ids, mask and how many were cut."""
    rows, cut = [], 0
    for item, prompt_len in zip(items, prompt_lengths):
        ids = collator.response_ids(item["sample"].response)
        room = max(0, max_length - prompt_len)
        cut += len(ids) > room
        rows.append(ids[:room])
    ids, mask = pad_rows(rows, collator.pad_token_id, "right")
    return ids.to(device), mask.to(device), cut


def pad_rows(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids, mask), both (len(rows), longest row or 1), padded on `side` with pad_id."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def model_inputs(batch: dict, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict:
    """The batch's tensors on `device` (pixels in the model's dtype); drops `samples`."""
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        if dtype is not None and key in ("pixel_values", "pixel_values_videos"):
            value = value.to(dtype)
        out[key] = value.to(device)
    return out


class SampleDataset(torch.utils.data.Dataset):
    """Samples whose media are decoded on access, so DataLoader workers do the decoding.

    on_bad="error": an unreadable video or image raises (naming annotation file, line, field, media).
    on_bad="skip": the item comes back with `bad` set and the error in `skipped`; with `replace`
    (training), question i is replaced by question random.Random(f"replace:{i}:{k}").randrange(n) for
    k = 0, 1, ... until one decodes, so the data a step sees is still a function of the step: a resumed
    run equals an uninterrupted one. Every item carries `skipped`: [{"index", "error"}]."""
    tries = 8

    def __init__(self, samples: list[Sample], collator: VideoCollator, *, on_bad: str = "error", replace: bool = False):
        self.samples, self.collator, self.on_bad, self.replace = samples, collator, on_bad, replace

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        skipped, j = [], i
        for k in range(self.tries):
            try:
                return {**self.collator.load(self.samples[j]), "index": j, "skipped": skipped, "bad": False}
            except DataError as e:
                if self.on_bad == "error":
                    raise DataError(f"{e} (--on_missing skip skips and counts such questions)") from e
                skipped.append({"index": j, "error": str(e)})
                if not self.replace:
                    return {"sample": self.samples[j], "index": j, "skipped": skipped, "bad": True}
                j = random.Random(f"replace:{i}:{k}").randrange(len(self.samples))
        raise DataError(f"{self.tries} questions in a row have unreadable media, the last: {skipped[-1]['error']}")


def drop_bad(collator: VideoCollator):
    """A collate_fn for evaluation: the batch of the items that decoded, plus `skipped` errors."""
    def collate(items: list[dict]) -> dict:
        good = [item for item in items if not item["bad"]]
        batch = collator(good) if good else {"samples": []}
        batch["skipped"] = [s for item in items for s in item["skipped"]]
        return batch
    return collate
