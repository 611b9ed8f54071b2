import filecmp
import os

import torch

import evaluate
from sbr.collate import VideoCollator
from sbr import cli
from sbr.data import load_seedbench
from sbr.model import load_model, visual_token_ids
from sbr.policy import Policy
from sbr.tiny import build_dataset, build_model, build_tokenizer


def test_tiny_default_is_deterministic(tmp_path):
    a, b = build_dataset(str(tmp_path / "a")), build_dataset(str(tmp_path / "b"))
    for split in ("training_6k", "validation_L1", "validation_L2", "validation_L3"):
        assert filecmp.cmp(f"{a}/annotations/{split}.jsonl", f"{b}/annotations/{split}.jsonl", shallow=False)
    tok = build_tokenizer()
    assert tok.get_vocab() == build_tokenizer().get_vocab()
    m1, m2 = build_model(tok).state_dict(), build_model(tok).state_dict()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)


def test_tiny_folder_reloads_as_real_weights_do(tiny):
    for family, cls in (("qwen2_vl", "Qwen2VLForConditionalGeneration"),
                        ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                        ("qwen3_vl", "Qwen3VLForConditionalGeneration")):
        path = os.path.join(tiny, family)
        assert os.path.exists(os.path.join(path, "model.safetensors"))
        model = load_model(path)
        assert type(model).__name__ == cls and model.config._attn_implementation == "sdpa"
        assert sum(p.numel() for p in model.parameters()) < 350_000
    text = model.config.text_config                      # Qwen3-VL's heads x head_dim != hidden, as at 4B
    assert text.num_attention_heads * text.head_dim == 2 * text.hidden_size
    assert model.config.vision_config.deepstack_visual_indexes == [0, 1]


def test_decoding_never_emits_visual_tokens(tiny, processor):
    """A model rigged to prefer <|image_pad|> above all must still not emit it."""
    model = load_model(os.path.join(tiny, "qwen2_vl"))
    vocab, hidden = model.lm_head.out_features, model.lm_head.in_features
    head = torch.nn.Linear(hidden, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    text_id = processor.tokenizer.convert_tokens_to_ids("A")
    with torch.no_grad():
        head.bias.fill_(-10.0)
        head.bias[visual_token_ids(processor.tokenizer)] = 10.0
        head.bias[text_id] = 5.0
    model.lm_head = head
    root = os.path.join(tiny, "data")
    samples = load_seedbench(os.path.join(root, "annotations", "validation_L1.jsonl"), root)[:2]
    collator = VideoCollator(processor)
    batch = collator([collator.load(s) for s in samples])
    cfg = evaluate.Config(max_new_tokens=3)
    policy = Policy(model, suppress_token_ids=visual_token_ids(processor.tokenizer))
    assert evaluate.generate(policy, batch, processor.tokenizer, cfg, "cpu", torch.float32) == ["AAA", "AAA"]


def test_cli_overrides_fields_by_name():
    cfg = cli.parse(evaluate.Config, ["--levels", "L1", "L3", "--limit", "2", "--trust_remote_code",
                                      "--model", "m", "--batch_size", "4"])
    assert cfg.levels == ["L1", "L3"] and cfg.limit == 2 and cfg.trust_remote_code is True
    assert cfg.model == "m" and cfg.batch_size == 4 and cfg.max_new_tokens == 256
