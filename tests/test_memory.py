r"""The memory plan on Qwen2-VL-7B-Instruct's published configuration (built on the meta device, no
download), against a hand calculation.

Parameters (config.json of Qwen/Qwen2-VL-7B-Instruct: hidden 3584, intermediate 18944, 28 layers, 28
heads, 4 KV heads, vocab 152064, untied; vision depth 32, embed_dim 1280, mlp_ratio 4):
  embedding = LM head = 152,064 x 3,584 = 544,997,376
  a decoder layer: q 3584^2 + 3584, k and v 3584 x 512 + 512 each, o 3584^2, MLP 3 x 3584 x 18944,
                   2 norms of 3584 -> 12,848,640 + 2 x 1,835,520 + 12,845,056 + 203,685,888 + 7,168 = 233,057,792
  vision: patch 1176 x 1280 = 1,505,280; a block 2,560 + (1280 x 3840 + 3840) + (1280^2 + 1280) + 2,560
          + (1280 x 5120 + 5120) + (5120 x 1280 + 1280) = 19,677,440, x 32 = 629,678,080; merger 2,560
          + (5120^2 + 5120) + (5120 x 3584 + 3584) = 44,575,744 -> V = 675,759,104
  P = 2 x 544,997,376 + 28 x 233,057,792 + 3,584 + 675,759,104 = 8,291,375,616;  root R = 1,089,998,336
GRPO, the paper's run: 8 GPUs (S = 8), G = 8, 1 question a GPU, micro-batch 1, prompt 900 tokens
(729 visual: 8 x 81 + 81), 256 completion tokens, beta 0.1, checkpointing, LM-head chunks of 256:
  every phase: policy 4P/8 = 4,145,687,808; AdamW 8P/8 = 8,291,375,616; reference 2P/8 = 2,072,843,904;
  fixed 2 GiB = 2,147,483,648 -> 16,657,390,976
  prefill: rollout weights 2P = 16,582,751,232; all-gather copy of the last layer 2Y = 466,115,584;
  prompt K/V 900 x 28 x (2 x 4 x 128 x 2) = 51,609,600 -> 33,757,867,392 B = 31.44 GiB (the peak)
  decoding: weights 2(P - V) = 15,231,233,024 (the vision tower resharded); KV cache (1 x 900 + 8 x 256)
  x 28 x 2048 = 169,050,112 (the prompt's K/V once for its 8 rows); logits 3 x 8 x 152,064 x 4 =
  14,598,144 -> 32,072,272,256 B = 29.87 GiB
  training: gradients 4P/8 = 4,145,687,808; root gradients 2R = 2,179,996,672; gathered units
  2 x (1,089,998,336 + 675,759,104 + 233,057,792) = 3,997,630,464; reduce-scatter buffer 4V =
  2,703,036,416; activations, T = 900 + 8 x 256 = 2,948: 2948 x 3584 x 2 x 28 = 591,675,392; prompt K/V
  (1 + 8) x 900 x 28 x 2048 = 464,486,400; vision 2 x 2916 x 1280 x 32 = 238,878,720; a layer recomputed
  2 x 2948 x (4 x 3584 + 3 x 18944) x 2 = 839,213,056; LM-head chunk 3 x 256 x 152,064 x 4 = 467,140,608
  -> 2,601,394,176;  -> 32,285,136,512 B = 30.07 GiB
  grad sync: gradients 4,145,687,808 + root gradients 2,179,996,672 + root reduce-scatter 4R =
  4,359,993,344 -> 27,343,068,800 B = 25.47 GiB
  -> fits 40 GiB with 8.56 GiB to spare, 80 GiB with 48.56.
SFT, 8 GPUs, micro-batch 1 x max_length 8192: activations 8192 x 3584 x 2 x 28 + 238,878,720
  + 2 x 8192 x 71,168 x 2 + 467,140,608 = 4,682,219,520; training 4,145,687,808 + 8,291,375,616
  + 2,147,483,648 + 4,145,687,808 + 2,179,996,672 + 3,997,630,464 + 2,703,036,416 + 4,682,219,520
  = 32,293,117,952 B = 30.08 GiB; grad sync 25,270,224,896 B.
"""
import pytest

from sbr.memory import GIB, grpo_plan, model_sizes, prompt_tokens, sft_plan


@pytest.fixture(scope="module")
def qwen2_vl_7b():
    from transformers import Qwen2VLConfig
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=3584, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return model_sizes(Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False))


def test_7b_parameter_counts_by_hand(qwen2_vl_7b):
    s = qwen2_vl_7b
    assert (s.total, s.layer, s.vision, s.root) == (8_291_375_616, 233_057_792, 675_759_104, 1_089_998_336)
    assert prompt_tokens(252, 16) == (729, 900)


def test_7b_grpo_plan_line_by_line(qwen2_vl_7b):
    visual, prompt = prompt_tokens(252, 16)
    plan = grpo_plan(qwen2_vl_7b, shard=8, G=8, questions=1, micro_questions=1, prompt=prompt, visual=visual,
                     completion=256, beta=0.1, checkpointing=True, chunk=256)
    lines = {name: b for _, name, b, _ in plan.lines}
    assert lines == {"policy parameters": 4_145_687_808, "AdamW state": 8_291_375_616, "reference": 2_072_843_904,
                     "CUDA context, NCCL": 2_147_483_648, "rollout weights": 16_582_751_232,
                     "all-gather copy": 466_115_584, "prompt K/V": 51_609_600, "decoding weights": 15_231_233_024,
                     "rollout KV cache": 169_050_112, "rollout logits": 14_598_144, "gradients": 4_145_687_808,
                     "root gradients": 2_179_996_672, "gathered units": 3_997_630_464,
                     "reduce-scatter buffer": 2_703_036_416, "activations": 2_601_394_176,
                     "root reduce-scatter": 4_359_993_344}
    assert [(p, plan.total(p)) for p in plan.phases()] == [
        ("prefill", 33_757_867_392), ("decoding", 32_072_272_256), ("training", 32_285_136_512),
        ("grad sync", 27_343_068_800)]
    assert plan.peak() == ("prefill", 33_757_867_392)
    for gib, spare in ((40, "+8.56"), (80, "+48.56")):
        text = plan.render(gib * GIB, f"8 x {gib} GB", [])
        assert f"peak: 31.44 GiB in the prefill phase, of {gib}.0 GiB: fits ({spare} GiB)" in text
        assert "WARNING" not in text
    tight = plan.render(24 * GIB, "8 x 24 GB", [])
    assert "DOES NOT FIT (-7.44 GiB)" in tight and "no flag of sbr lowers its peak" in tight


def test_7b_sft_plan(qwen2_vl_7b):
    visual, _ = prompt_tokens(252, 16)
    plan = sft_plan(qwen2_vl_7b, shard=8, micro_batch=1, max_length=8192, visual=visual, checkpointing=True, chunk=256)
    lines = {name: b for _, name, b, _ in plan.lines}
    assert lines["activations"] == 4_682_219_520 and "reference" not in lines and "rollout weights" not in lines
    assert plan.peak() == ("training", 32_293_117_952) and plan.total("grad sync") == 25_270_224_896
    assert "fits" in plan.render(40 * GIB, "8 x 40 GB", [])


def test_dry_run_prints_the_plan_and_loads_nothing(tiny, capsys):
    import os
    import torch.distributed as dist
    import train_grpo
    import train_sft
    model, data = os.path.join(tiny, "qwen2_vl"), os.path.join(tiny, "data")
    assert train_grpo.main(train_grpo.Config(model=model, data_root=data, dry_run=True, plan_world_size=8)) == []
    out = capsys.readouterr().out
    assert "memory plan, GRPO on 8 x 40 GiB (planned; no GPU here)" in out and "rollout KV cache" in out
    assert train_sft.main(train_sft.Config(model=model, data_root=data, dry_run=True, gpu_memory_gib=80)) == []
    assert "memory plan, SFT on 1 x 80 GiB" in capsys.readouterr().out
    assert not dist.is_initialized()


def test_7b_decode_step_bytes(qwen2_vl_7b):
    """A decoding step of the paper's rollout reads, in bf16: weights (28 x 233,057,792 + 152,064 x 3,584
    + 3,584) x 2 = 14,141,238,272; the prompt's K/V once, 900 x 28 x (2 x 4 x 128 x 2) = 51,609,600 (G = 8
    copies would be 412,876,800); the rows' own K/V, 8 x (256 + 1) / 2 x 57,344 = 58,949,632 on average.
    At an A100-40GB's 1,555 GB/s that is 9.2 ms a step; at an H100 SXM's 3,350 GB/s 4.3 ms."""
    from sbr.memory import decode_step_bytes
    b = decode_step_bytes(qwen2_vl_7b, questions=1, prompt=900, G=8, completion=256)
    assert b == {"weights": 14_141_238_272, "prompt_kv": 51_609_600, "own_kv": 58_949_632}
    assert round(sum(b.values()) / 1555e9 * 1e3, 1) == 9.2 and round(sum(b.values()) / 3350e9 * 1e3, 1) == 4.3


def test_ema_reference_is_planned_in_fp32(qwen2_vl_7b):
    """GRPO-CARE's EMA reference keeps fp32 shards: 4P/8 = 4,145,687,808 B instead of 2P/8; none at all
    with beta 0 and a frozen reference."""
    visual, prompt = prompt_tokens(252, 16)
    kw = dict(shard=8, G=8, questions=1, micro_questions=1, prompt=prompt, visual=visual, completion=256, beta=0.0,
              checkpointing=True, chunk=256)
    lines = lambda plan: {name: b for _, name, b, _ in plan.lines}           # noqa: E731
    assert lines(grpo_plan(qwen2_vl_7b, reference="ema", **kw))["reference"] == 4_145_687_808
    assert lines(grpo_plan(qwen2_vl_7b, reference="frozen", **kw))["reference"] == 2_072_843_904
    assert "reference" not in lines(grpo_plan(qwen2_vl_7b, **kw))


# ---------------------------------------------------------------------------- from a login node
PUBLISHED = {"Qwen/Qwen2-VL-2B-Instruct": 2_208_985_600, "Qwen/Qwen2-VL-7B-Instruct": 8_291_375_616,
             "Qwen/Qwen2.5-VL-3B-Instruct": 3_754_622_976, "Qwen/Qwen2.5-VL-7B-Instruct": 8_292_166_656,
             "Qwen/Qwen3-VL-8B-Instruct": 8_767_123_696}


def test_qwen3_vl_8b_by_hand():
    r"""Qwen3-VL-8B-Instruct's published config (hidden 4096, MLP 12288, 36 layers, 32 heads of 128, 8 KV
    heads, vocab 151,936, untied; vision 27 blocks of 1152, MLP 4304, patch 16, 2304 position embeddings,
    DeepStack from blocks 8, 16, 24):
      embedding = LM head = 151,936 x 4,096 = 622,329,856;  root R = 2 x that + 4,096 = 1,244,663,808
      a layer: q, o 4096^2; k, v 4096 x 1024; q/k norms 2 x 128; MLP 3 x 4096 x 12288; 2 norms of 4096
               = 2 x 16,777,216 + 2 x 4,194,304 + 256 + 150,994,944 + 8,192 = 192,946,432
      vision: a block 4 x 1152 + (1152 x 3456 + 3456) + (1152^2 + 1152) + (1152 x 4304 + 4304) + (4304 x 1152
              + 1152) = 15,239,504, x 27 = 411,466,608; patch 1536 x 1152 + 1152 = 1,770,624; position
              embedding 2304 x 1152 = 2,654,208; merger 2 x 1152 + (4608^2 + 4608) + (4608 x 4096 + 4096)
              = 40,119,040; 3 DeepStack mergers (their norm over 4608) 3 x 40,125,952 = 120,377,856
              -> V = 576,388,336
      P = 1,244,663,808 + 36 x 192,946,432 + 576,388,336 = 8,767,123,696 ("8.77B").
    Prompt at 256 px: 64 merged tokens a frame pair and the image, 8 x 64 + 64 = 576 visual; 171 text and
    8 x 8 timestamp tokens (assumed) = 811."""
    from sbr.published import load_config
    s = model_sizes(load_config("Qwen/Qwen3-VL-8B-Instruct"))
    block = 4 * 1152 + (1152 * 3456 + 3456) + (1152 ** 2 + 1152) + (1152 * 4304 + 4304) + (4304 * 1152 + 1152)
    merger = 2 * 1152 + (4608 ** 2 + 4608) + (4608 * 4096 + 4096)
    vision = 27 * block + (1536 * 1152 + 1152) + 2304 * 1152 + merger + 3 * (merger - 2 * 1152 + 2 * 4608)
    layer = 2 * 4096 ** 2 + 2 * 4096 * 1024 + 2 * 128 + 3 * 4096 * 12288 + 2 * 4096
    assert (block, vision, layer) == (15_239_504, 576_388_336, 192_946_432)
    assert (s.total, s.layer, s.vision, s.root, s.head_dim) == (8_767_123_696, layer, vision, 1_244_663_808, 128)
    assert (s.frame_multiple, s.default_frame, s.pair_text, s.attn_width) == (32, 256, 8, 32 * 128)
    assert prompt_tokens(256, 16, multiple=32, pair_text=8) == (576, 811)


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_shipped_configurations_offline(hub_id, qwen2_vl_7b):
    """sbr's copies of the published config.json files, read with HF_HUB_OFFLINE=1 and no cache: the
    parameter counts published for each model (the 7B's equal the hand count above, line by line)."""
    from sbr.published import config_source, load_config
    assert config_source(hub_id) == "published"
    s = model_sizes(load_config(hub_id))
    assert s.total == PUBLISHED[hub_id]
    if hub_id == "Qwen/Qwen2-VL-7B-Instruct":
        assert s == qwen2_vl_7b


def test_dry_run_from_a_login_node(tmp_path, capsys, monkeypatch):
    """No --data_root, no weights, no network: a hub id sbr ships, or a folder holding only config.json.
    An unknown hub id offline is one message naming what would work."""
    import shutil
    import train_grpo
    import train_sft
    from sbr.common import ConfigError
    from sbr.published import CONFIGS
    monkeypatch.chdir(tmp_path)                     # nothing is written: the folder stays empty
    assert train_grpo.main(train_grpo.Config(model="Qwen/Qwen2-VL-7B-Instruct", dry_run=True, plan_world_size=8)) == []
    out = capsys.readouterr().out
    assert "sbr's copy of its published config.json" in out and "no data read" in out
    assert "peak: 31.44 GiB in the prefill phase, of 40.0 GiB: fits (+8.56 GiB)" in out     # the hand count above
    folder = tmp_path / "only_config"
    folder.mkdir()
    shutil.copy(f"{CONFIGS}/Qwen--Qwen2.5-VL-3B-Instruct.json", folder / "config.json")
    assert train_sft.main(train_sft.Config(model=str(folder), dry_run=True, plan_world_size=2)) == []
    assert "(its config.json), 3,754,622,976 parameters" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only_config"]
    with pytest.raises(ConfigError, match="published configurations sbr ships: Qwen/Qwen2-VL-2B-Instruct"):
        train_grpo.main(train_grpo.Config(model="nobody/nothing", dry_run=True))
    import time
    start = time.time()                              # a path that is no folder: named at once, no hub retries
    with pytest.raises(ConfigError, match="only_config/nope: no such folder, and not a hub id"):
        train_grpo.main(train_grpo.Config(model=str(folder / "nope"), dry_run=True))
    assert time.time() - start < 2


def test_advice_names_only_flags_that_exist_and_help():
    """Out of memory, each advised change is a real flag at a value it accepts, not already set, whose own
    plan (recomputed here) has the peak it states; the paper's run already at 1 question a GPU is not told
    to lower it; 8 x 24 GB fits on 32 GPUs."""
    import re
    import dataclasses
    import train_grpo
    from sbr.memory import plan_for
    cfg = train_grpo.Config(model="Qwen/Qwen2-VL-7B-Instruct", gpu_memory_gib=24)
    text = plan_for(cfg, 8, "grpo", train_grpo.needs_reference)
    advice = re.findall(r"^    --(\w+) (\S+): peak ([\d.]+) GiB", text, re.M)
    assert advice and "--questions_per_rank" not in text and "--micro_batch_questions" not in text
    fields = {f.name for f in dataclasses.fields(train_grpo.Config)}
    for flag, value, peak in advice:
        assert flag in fields and str(getattr(cfg, flag)) != value
        if flag == "plan_world_size":
            world, changed = int(value), cfg
        else:
            world, changed = 8, train_grpo.cli.parse(train_grpo.Config, ["--model", cfg.model, "--gpu_memory_gib", "24",
                                                                          f"--{flag}", value])
        train_grpo.check_config(dataclasses.replace(changed, dry_run=True))
        assert f"peak: {peak} GiB" in plan_for(changed, world, "grpo", train_grpo.needs_reference)
        assert float(peak) < 31.44
    assert "--plan_world_size 32: peak 21.30 GiB, fits" in text


def test_an_entropy_bonus_adds_one_lm_head_chunk_buffer(qwen2_vl_7b):
    """--entropy_coef backpropagates through the chunk's entropy: one more (256, 152,064) fp32 buffer,
    155,713,536 B, in the training phase's activations."""
    visual, prompt = prompt_tokens(252, 16)
    kw = dict(shard=8, G=8, questions=1, micro_questions=1, prompt=prompt, visual=visual, completion=256, beta=0.1,
              checkpointing=True, chunk=256)
    plain, bonus = grpo_plan(qwen2_vl_7b, **kw), grpo_plan(qwen2_vl_7b, entropy_grad=True, **kw)
    assert bonus.total("training") - plain.total("training") == 256 * 152_064 * 4 == 155_713_536


# ---------------------------------------------------------------------------- LoRA and offload
def _paper_grpo(s, **kw):
    visual, prompt = prompt_tokens(252, 16)
    return grpo_plan(s, shard=8, G=8, questions=1, micro_questions=1, prompt=prompt, visual=visual, completion=256,
                     beta=0.1, checkpointing=True, chunk=256, **kw)


def test_7b_lora_lines_by_hand(qwen2_vl_7b):
    """LoRA r = 64 on the seven projections of Qwen2-VL-7B's 28 layers (sbr/lora.py's docstring): a layer
    r x (2 x 3584 (q) + 2 x (3584 + 512) (k, v) + 2 x 3584 (o) + 3 x (3584 + 18944) (MLP)) = r x 90,112,
    x 28 = 2,523,136 r; A = 161,480,704 at r = 64, A_Y = 5,767,168, none in the root or the tower.
    S = 8, the paper's GRPO (beta 0.1):
      every phase: base 2P/8 = 2,072,843,904; adapters 4A/8 = 80,740,352; AdamW 8A/8 = 161,480,704;
      fixed 2,147,483,648; no reference (the base is the policy with its adapters off)
      prefill: rollout weights 2P + 2A = 16,582,751,232 + 322,961,408 = 16,905,712,640; all-gather copy
      2(Y + A_Y) = 477,649,920; prompt K/V 51,609,600 -> 21,897,520,768 B = 20.39 GiB (the peak)
      decoding weights 2(P - V + A) = 15,554,194,432
      training: gradients 4A/8 = 80,740,352; gathered units 2(R + V + Y + A_Y) = 2 x 2,004,582,400 =
      4,009,164,800; reduce-scatter buffer 4 A_Y = 23,068,672; no root gradients, no root reduce-scatter
      (embedding and LM head frozen)."""
    s = qwen2_vl_7b
    assert (s.adapter_layer, s.adapter_total, s.adapter_root, s.adapter_vision) == (90_112, 2_523_136, 0, 0)
    plan = _paper_grpo(s, lora_rank=64)
    lines = {name: b for _, name, b, _ in plan.lines}
    assert lines == {"base parameters": 2_072_843_904, "adapters": 80_740_352, "AdamW state": 161_480_704,
                     "CUDA context, NCCL": 2_147_483_648, "rollout weights": 16_905_712_640,
                     "all-gather copy": 477_649_920, "prompt K/V": 51_609_600, "decoding weights": 15_554_194_432,
                     "rollout KV cache": 169_050_112, "rollout logits": 14_598_144, "gradients": 80_740_352,
                     "gathered units": 4_009_164_800, "reduce-scatter buffer": 23_068_672, "activations": 2_601_394_176}
    assert lines["base parameters"] == 2 * s.total // 8 and 161_480_704 == 64 * 2_523_136
    assert plan.peak() == ("prefill", 21_897_520_768) and not plan.host
    assert "reference" not in {name for _, name, *_ in _paper_grpo(s, lora_rank=64, reference="frozen").lines}


def test_offload_moves_lines_to_the_host(qwen2_vl_7b):
    """--offload params: the fp32 shards, the AdamW state, the reference's shards and the gradients go to
    the host; each GPU phase drops by exactly the moved lines it held (every phase: 4P/8 + 8P/8 + 2P/8 =
    14,509,907,328; training and grad sync also the gradients 4P/8). SFT's peak, the training phase, holds
    them all: 32,293,117,952 - 16P/8 = 15,710,366,720. --offload optimizer moves the AdamW state alone."""
    gpu, off = _paper_grpo(qwen2_vl_7b), _paper_grpo(qwen2_vl_7b, offload="params")
    moved = {name: (ps, b) for ps, name, b, _ in off.host}
    assert sorted(moved) == ["AdamW state", "gradients", "policy parameters", "reference"]
    assert not moved.keys() & {name for _, name, *_ in off.lines}
    assert sorted(off.lines) == sorted(line for line in gpu.lines if line[1] not in moved)
    for phase in gpu.phases():
        held = sum(b for ps, b in moved.values() if ps == "all" or phase in ps.split("+"))
        assert gpu.total(phase) - off.total(phase) == held
    assert off.host_total() == 18 * qwen2_vl_7b.total // 8
    visual, _ = prompt_tokens(252, 16)
    sft = [sft_plan(qwen2_vl_7b, shard=8, micro_batch=1, max_length=8192, visual=visual, checkpointing=True, chunk=256,
                    offload=o) for o in ("none", "params")]
    assert sft[0].peak()[1] - sft[1].peak()[1] == sft[1].host_total() == 16_582_751_232
    assert sft[1].peak() == ("training", 15_710_366_720)
    adam = _paper_grpo(qwen2_vl_7b, offload="optimizer")
    assert [name for _, name, *_ in adam.host] == ["AdamW state"] and adam.host_total() == 8_291_375_616
    text = off.render(40 * GIB, "8 x 40 GB", [])
    assert "host memory (pinned, --offload params), per process (GiB):" in text


def test_the_host_section_per_node():
    """Per node: min(world, 8) processes; full 7B GRPO on 16 GPUs, 18P/16 = 9,327,797,568 B a process."""
    import dataclasses
    import train_grpo
    from sbr.memory import plan_for
    cfg = dataclasses.replace(train_grpo.Config(model="Qwen/Qwen2-VL-7B-Instruct", gpu_memory_gib=80), offload="params")
    text = plan_for(cfg, 16, "grpo", train_grpo.needs_reference)
    assert f"a process           total                 {9_327_797_568 / GIB:6.2f}" in text
    assert f"a node              total                 {8 * 9_327_797_568 / GIB:6.2f}   8 processes" in text


def test_advice_on_one_80_gb_gpu_names_lora():
    """7B full GRPO on 1 x 80 GB (151.69 GiB) is told --lora_rank 64 (35.49 GiB) and --offload params
    (17.93 GiB, with its host memory) fit; on 1 x 16 GiB none fits alone, so the best two together are tried."""
    import dataclasses
    import train_grpo
    from sbr.memory import plan_for
    cfg = train_grpo.Config(model="Qwen/Qwen2-VL-7B-Instruct", gpu_memory_gib=80)
    text = plan_for(cfg, 1, "grpo", train_grpo.needs_reference)
    assert "peak: 151.69 GiB in the training phase" in text
    assert "\n    --lora_rank 64: peak 35.49 GiB, fits (+44.51 GiB)" in text
    assert "\n    --offload params: peak 17.93 GiB, fits (+62.07 GiB)" in text and "GiB a node" in text
    assert "best two together" not in text
    lora = plan_for(dataclasses.replace(cfg, lora_rank=64), 1, "grpo", train_grpo.needs_reference)
    assert "peak: 35.49 GiB in the prefill phase, of 80.0 GiB: fits" in lora
    assert "161,480,704 adapter parameters" in lora
    tight = plan_for(dataclasses.replace(cfg, gpu_memory_gib=16), 1, "grpo", train_grpo.needs_reference)
    assert "\n    --offload params --lora_rank 64: peak 18.24 GiB, still does not fit" in tight
    assert "no single change fits: the best two together" in tight


def test_readme_fit_table_is_fit_table():
    """README's "What fits where" is fit_table()'s output at train_grpo.py's defaults, so it cannot go stale."""
    import os
    import train_grpo
    from sbr.memory import fit_table
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    lines = readme.split("\n#### What fits where\n", 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = "\n".join(lines[first:next(i for i in range(first, len(lines)) if not lines[i].startswith("|"))])
    assert table == fit_table(train_grpo.Config(), train_grpo.needs_reference)
