"""The built-in tiny default: a tiny random Qwen2-VL (and Qwen2.5-VL, Qwen3-VL) and a tiny SEED-Bench-R1, offline.

    python -m sbr.tiny runs/tiny        # or let evaluate.py / train_grpo.py build it on first use

Everything is made here, deterministically, with no download: a byte-level BPE tokenizer trained on
the dataset's own words (Qwen2's pre-tokenizer and special tokens, the Qwen2-VL chat template), the
real Hugging Face processor classes, a ~0.2M-parameter model saved with `save_pretrained`
(safetensors), and a dataset in the real layout (annotation .jsonl files, .mp4 clips, .png images),
plus a LongVideoBench-style `lvb_val.json`. The code that reads them is the code that reads the real
weights and data. Writing .mp4 files needs PyAV (the `tiny` extra).
"""
import json
import os
import random
import shutil
import sys

import numpy as np
import torch

VERSION = "4"   # bump when what is built changes, so stale copies are rebuilt
OWN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "data", "longvideobench")   # what ensure_tiny builds under its root

# The Qwen2-VL-Instruct chat template (Qwen2.5-VL's is the same), default system prompt included.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct's template renders media the same way and adds no default system message.
CHAT_TEMPLATE_QWEN3 = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")
assert CHAT_TEMPLATE_QWEN3 != CHAT_TEMPLATE
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# ---------------------------------------------------------------------------- the synthetic tasks
TASKS = {  # task goal -> its procedure, in order
    "make tea": ["boil water", "take cup", "put teabag in cup", "pour water", "add milk"],
    "wash dishes": ["turn on tap", "take sponge", "scrub plate", "rinse plate", "put plate on rack"],
    "make sandwich": ["take bread", "spread butter", "add cheese", "close sandwich", "cut sandwich"],
    "repair bike": ["flip bike", "remove wheel", "patch tube", "refit wheel", "pump tyre"],
    "paint fence": ["open paint", "stir paint", "dip brush", "paint board", "clean brush"],
    "plant seeds": ["fill pot", "make hole", "drop seed", "cover soil", "water pot"],
}
L3_DOMAINS = ["Daily life", "Hobbies", "Recreation", "Work"]
QUESTION = ("Considering the progress shown in the video and my current observation shown in the image, "
            "what action should I take next in order to {goal}?")


def _question(rng: random.Random, goal: str, done: int):
    """(question, answer, negatives) for a task whose first `done` steps are finished."""
    steps = TASKS[goal]
    answer = steps[done]
    others = [s for g, ss in TASKS.items() for s in ss if s != answer]
    negatives = [s for s in steps if s != answer] + rng.sample(others, 2)
    return QUESTION.format(goal=goal), answer, negatives


# ---------------------------------------------------------------------------- model and processor
def build_tokenizer(words: list[str] | None = None):
    """A byte-level BPE of ~384 tokens trained on `words` (default: the tiny tasks) and the prompt's
    fixed text, with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from sbr.prompt import R1_SUFFIX

    if words is None:
        words = [QUESTION.format(goal=g) for g in TASKS] + [s for ss in TASKS.values() for s in ss]
    corpus = words + [R1_SUFFIX, "A. B. C. D. E.", "<think> the video shows </think><answer> B. </answer>",
                      "You are a helpful assistant.", "system user assistant"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=384, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer, family: str = "qwen2_vl"):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen2VLProcessor, Qwen2_5_VLProcessor
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor
        # Qwen3-VL's: 16-pixel patches, mean = std = 0.5; pixel bounds that leave 256x256 frames as they are
        kw = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        image = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=256 * 256, **kw)
        video = Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 256 * 256},
                                      do_sample_frames=False, cap_pixels_per_frame=False, **kw)
        return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                chat_template=CHAT_TEMPLATE_QWEN3)
    # min/max pixels that leave the 252x252 inputs as they are (the real Qwen2-VL processor's video
    # min_pixels would upscale them; sbr's collator does not use it, this keeps the parity test exact)
    kw = dict(min_pixels=28 * 28, max_pixels=252 * 252, patch_size=14, temporal_patch_size=2, merge_size=2)
    image = Qwen2VLImageProcessor(**kw)
    video = Qwen2VLVideoProcessor(**kw, do_sample_frames=False)
    cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, family: str = "qwen2_vl", seed: int = 0, *, hidden: int = 64, layers: int = 2,
                vision_width: int = 32, vision_depth: int = 2, vocab: int = 512, qwen3_head_dim: int = 0):
    """A random Qwen2-VL / Qwen2.5-VL / Qwen3-VL of the real classes, small enough for CPU tests.
    `qwen3_head_dim`: Qwen3-VL's head size (0: 2 x hidden / heads, so heads x head_dim != hidden as at 4B)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2_5_VLConfig, \
        Qwen2_5_VLForConditionalGeneration
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    assert len(tokenizer) <= vocab, f"tokenizer has {len(tokenizer)} tokens, model vocab {vocab}"
    heads = 4
    head_dim = hidden // heads
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
        # Qwen3's decoder (q/k RMSNorm, head_dim apart from hidden / heads), interleaved mRoPE whose
        # sections sum to head_dim / 2 as [24, 20, 20] does for 128; DeepStack from two of three vision blocks
        head_dim = qwen3_head_dim or 2 * head_dim    # heads x head_dim = 2 x hidden, as Qwen3-VL-4B's 32 x 128 vs 2560
        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                                                        "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]})
        vision = dict(depth=vision_depth + 1, hidden_size=vision_width, intermediate_size=2 * vision_width, num_heads=2,
                      out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, vision_depth - 1])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen3VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=vision_width, out_hidden_size=hidden,
                      intermediate_size=2 * vision_width, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1],
                      tokens_per_second=2)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.generation_config.eos_token_id = text["eos_token_id"]
    model.generation_config.pad_token_id = text["pad_token_id"]
    return model


def build_model_dir(out: str, family: str = "qwen2_vl", seed: int = 0, words: list[str] | None = None,
                    **sizes) -> str:
    """Tokenizer, processor and a random model of `sizes` (see build_model) saved as an HF folder."""
    tokenizer = build_tokenizer(words)
    processor = build_processor(tokenizer, family)
    model = build_model(tokenizer, family, seed, **sizes)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- media
def write_video(path: str, frames: np.ndarray, fps: int) -> None:
    """frames (T, H, W, 3) uint8 -> .mp4 (MPEG-4 part 2, which every FFmpeg build of PyAV encodes)."""
    import av
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qscale": "3"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _frames(rng: np.random.Generator, n: int, style: int, done: int, h: int = 64, w: int = 96) -> np.ndarray:
    """A moving bar over a background whose colour is the 'environment'; `done` squares mark progress."""
    base = np.array([[200, 60, 60], [60, 160, 60], [60, 60, 200]][style % 3], dtype=np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        frame = base + rng.normal(0, 12, (h, w, 3))
        x = int((t / max(n - 1, 1)) * (w - 12))
        frame[:, x:x + 12] = 240
        for k in range(done):
            frame[4:14, 4 + 14 * k:14 + 14 * k] = 20
        out[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


def _image(path: str, rng: np.random.Generator, style: int, done: int) -> None:
    from PIL import Image
    Image.fromarray(_frames(rng, 1, style, done, h=80, w=80)[0]).save(path)


# ---------------------------------------------------------------------------- dataset
def build_dataset(root: str, seed: int = 0) -> str:
    """A tiny SEED-Bench-R1 in the real layout: 16 training questions, L1 8, L2 6, L3 8 (two per domain),
    clip lengths from 0.75 s (3 frames) to 12 s (48 frames at 4 fps), some questions with no progress."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    for d in ("annotations", "videos/EpicKitchens", "videos/Ego4D", "images/EpicKitchens", "images/Ego4D"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    seen, unseen = list(TASKS)[:4], list(TASKS)[4:]
    seconds = [0.75, 1.5, 2.5, 4, 6, 8, 12]
    sft = []
    splits = {"training_6k": (16, seen, 0, "EpicKitchens"), "validation_L1": (8, seen, 0, "EpicKitchens"),
              "validation_L2": (6, seen, 1, "Ego4D"), "validation_L3": (8, unseen, 2, "Ego4D")}
    for split, (count, goals, style, source) in splits.items():
        records = []
        for i in range(count):
            goal = goals[i % len(goals)]
            done = i % len(TASKS[goal])                        # steps already finished; 0 = no progress
            question, answer, negatives = _question(rng, goal, done)
            name = f"{split}_{i:03d}"
            record = {"sample_id": f"{split[-2:]}-{i}" if split == "validation_L3" else i, "question": question,
                      "task_goal": goal, "video_source": source, "video_basename": f"{name}.mp4",
                      "current_observation_basename": f"{name}.png",
                      "task_progress_metadata": [{"narration_text": s, "start_frame": 0, "stop_frame": 1}
                                                 for s in TASKS[goal][:done]]}
            if done:
                fps = 4
                n = max(3, int(seconds[i % len(seconds)] * fps))
                write_video(os.path.join(root, "videos", source, f"{name}.mp4"), _frames(nrng, n, style, done), fps)
            _image(os.path.join(root, "images", source, f"{name}.png"), nrng, style, done)
            if split == "training_6k":
                record.update(answer=answer, negative_answers=negatives)
                sft.append(_sft_record(rng, i, question, answer, negatives, TASKS[goal][:done], source, name, done))
            else:
                options = [answer] + rng.sample(negatives, 3)
                rng.shuffle(options)
                record.update({f"choice_{c}": o for c, o in zip("abcd", options)})
                record.update(golden_choice_idx="ABCD"[options.index(answer)], answer=answer)
            if split == "validation_L3":
                record["domain"] = L3_DOMAINS[i % 4]
            records.append(record)
        with open(os.path.join(root, "annotations", f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(root, "annotations", "training_with_cot_6k.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in sft)
    return root


def _sft_record(rng, i, question, answer, negatives, done_steps, source, name, done):
    """A chat prompt (media paths relative to the data root) and a distilled-style chain of thought."""
    from sbr.data import Sample
    from sbr.prompt import build_question
    options = [answer] + rng.sample(negatives, 3)
    rng.shuffle(options)
    letter = "ABCD"[options.index(answer)]
    content = [{"type": "video", "video": f"videos/{source}/{name}.mp4"}] if done else []
    content += [{"type": "image", "image": f"images/{source}/{name}.png"},
                {"type": "text", "text": build_question(Sample(i, question, options, letter))}]
    shown = ", ".join(done_steps) if done_steps else "nothing yet"
    response = (f"<think>The video shows {shown}. The next step is to {answer}.</think>"
                f"<answer>{letter}. {answer}</answer>")
    return {"sample_id": i, "prompt": [{"role": "user", "content": content}], "response": response}


def build_longvideobench(root: str, seed: int = 0) -> str:
    """A tiny LongVideoBench validation: `lvb_val.json` and videos/, 8 questions over the 4 duration
    groups and both levels, 4 or 5 candidates, each record with the real file's fields (values made up,
    `duration` inside its group; the clips themselves are a few seconds long)."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    # (question_category, level) pairs as LongVideoBench files them: perception (S2E, E2O), relation (T3O, SSS)
    categories = [("S2E", "L1-Perception"), ("T3O", "L2-Relation"), ("E2O", "L1-Perception"), ("SSS", "L2-Relation")]
    durations = {15: 12.4, 60: 41.0, 600: 190.16, 3600: 1834.5}
    records = []
    for i in range(8):
        goal = list(TASKS)[i % len(TASKS)]
        video_id = f"tinyvid{i:03d}"
        write_video(os.path.join(root, "videos", f"{video_id}.mp4"), _frames(nrng, 8 + 4 * i, i, i % 4), 4)
        candidates = rng.sample(TASKS[goal], 4 + i % 2)
        group = [15, 60, 600, 3600][i % 4]
        category, level = categories[(i // 2) % 4]
        question = f"What happens first when I {goal}?"
        records.append({"video_id": video_id, "question": question, "question_wo_referring_query": question,
                        "candidates": candidates, "correct_choice": rng.randrange(len(candidates)),
                        "position": [10 * i + 3], "topic_category": "HT-How-To",
                        "question_category": category, "level": level, "id": f"{video_id}_{i % 2}",
                        "video_path": f"{video_id}.mp4", "subtitle_path": f"{video_id}_en.json",
                        "duration_group": group, "starting_timestamp_for_subtitles": 0,
                        "duration": durations[group], "view_count": 1000 + i})
    with open(os.path.join(root, "lvb_val.json"), "w") as f:
        json.dump(records, f, indent=1)
    return root


def ensure_tiny(root: str = "runs/tiny") -> str:
    """Build the tiny default under `root` unless a complete copy of this version is there.
    Built in a temporary folder and renamed, so a crash never leaves a half-built default."""
    marker = os.path.join(root, "VERSION")
    if os.path.exists(marker) and open(marker).read().strip() == VERSION:
        return root
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_model_dir(os.path.join(tmp, "qwen2_vl"), "qwen2_vl")
    build_model_dir(os.path.join(tmp, "qwen2_5_vl"), "qwen2_5_vl")
    build_model_dir(os.path.join(tmp, "qwen3_vl"), "qwen3_vl")
    build_dataset(os.path.join(tmp, "data"))
    build_longvideobench(os.path.join(tmp, "longvideobench"))
    os.makedirs(root, exist_ok=True)
    for name in OWN:                                  # its own entries only: runs/tiny/demo (sbr/demo.py) stays
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.replace(os.path.join(tmp, name), os.path.join(root, name))
    with open(os.path.join(root, "VERSION"), "w") as f:   # last: a kill before this rebuilds next time
        f.write(VERSION)
    shutil.rmtree(tmp)
    return root


def fill_defaults(model: str, data_root: str, tiny_dir: str, *, data: str = "data") -> tuple[str, str]:
    """An empty `model` or `data_root` means the tiny default's (rank 0 builds it once; others wait).
    data="demo": the demonstration's warmed-up model and synthetic data (sbr/demo.py) instead of the
    machinery check's random model and hand-made records."""
    if model and data_root:
        return model, data_root
    import torch.distributed as dist
    if data == "demo":
        from sbr import demo                          # (lazily: sbr.demo imports sbr.training, which imports this)
        build, (default_model, default_data) = demo.ensure_demo, demo.paths(tiny_dir)
    else:
        build, default_model, default_data = ensure_tiny, os.path.join(tiny_dir, "qwen2_vl"), os.path.join(tiny_dir, data)
    if not dist.is_initialized() or dist.get_rank() == 0:
        build(tiny_dir)
    if dist.is_initialized():
        dist.barrier()
    return model or default_model, data_root or default_data


if __name__ == "__main__":
    print(ensure_tiny(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny"))
