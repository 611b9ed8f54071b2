"""The attention analysis (sbr/attention.py) against transformers' own eager attention
(`output_attentions=True`) on the tiny models, a left-padded batch of prompts with and without video
and right-padded completions; the shares and measures by hand."""
import math
import os

import pytest
import torch

from sbr.attention import measures, prompt_attention, query_mask, shares
from sbr.model import load_model
from sbr.rollout import sample
from test_policy import setup


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_prompt_attention_equals_transformers_eager_attention(tiny, family):
    processor, model, policy, inputs, eos = setup(tiny, family)
    out = sample(policy, inputs, 1, max_new_tokens=6, eos_token_ids=[-1], pad_token_id=0, greedy=True)
    ids, mask = out.completion_ids, out.completion_mask.clone()
    mask[1, 4:] = 0                                       # a shorter completion: right padding
    queries = mask.clone()
    queries[0, 0] = 0                                     # not every generated token is measured
    P = inputs["input_ids"].shape[1]
    for layers in (None, [1]):
        a = prompt_attention(policy, inputs, ids, queries, layers)
        eager = load_model(os.path.join(tiny, family), attn="eager").eval()
        full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], ids], 1),
                "attention_mask": torch.cat([inputs["attention_mask"], mask], 1),
                "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1)}
        with torch.no_grad():
            att = eager(**full, output_attentions=True).attentions                # per layer (B, H, L, L)
        chosen = range(len(att)) if layers is None else layers
        ref = torch.stack([att[i][:, :, P:, :P].mean(1) for i in chosen]).mean(0)  # (B, C, P)
        ref = (ref * queries[:, :, None]).sum(1) / queries.sum(1, keepdim=True)
        assert torch.allclose(a, ref, atol=1e-6), (a - ref).abs().max()
    assert (a[inputs["attention_mask"] == 0] == 0).all()                            # padding gets none
    rec = shares(a, inputs, processor.tokenizer.convert_tokens_to_ids("<|video_pad|>"),
                 processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"), maps=True)
    for b, r in enumerate(rec):                            # the three shares: all the prompt's attention
        assert sum(r["video"]) + (r["image"] or 0) + r["text"] == pytest.approx(float(a[b].sum()), abs=1e-6)
    assert rec[0]["video"] == [] and len(rec[1]["video"]) == int(inputs["video_grid_thw"][0, 0])
    assert sum(map(sum, rec[1]["video_maps"][0])) == pytest.approx(rec[1]["video"][0])


def test_think_tokens_or_all(processor):
    tok = processor.tokenizer
    texts = ["<think>look left</think><answer>A</answer>", "no tags at all"]
    enc = [tok(t)["input_ids"] for t in texts]
    C = max(map(len, enc))
    ids = torch.tensor([e + [0] * (C - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (C - len(e)) for e in enc])
    q, fallback = query_mask(tok, ids, mask, "think")
    measured = tok.decode(ids[0][q[0].bool()])
    assert "look left" in measured and "answer" not in measured and torch.equal(q[1], mask[1])     # no block: all
    assert fallback.tolist() == [False, True]
    q, fallback = query_mask(tok, ids, mask, "all")
    assert torch.equal(q, mask) and not fallback.any()


def test_shares_map_each_temporal_grid_and_position():
    """A known, non-uniform attention row: a video of 2 temporal grids of 2 x 2 merged tokens (grid_thw
    (2, 4, 4)) then an image of 1 x 2 (grid (1, 2, 4)), text around; the shares land where Qwen's merged
    tokens sit (time, then rows, then columns)."""
    V, I = 7, 8
    ids = torch.tensor([[0, 1, V, V, V, V, V, V, V, V, 2, I, I, 3]])
    a = torch.tensor([[0.0, 0.01, .1, .2, .3, .4, .01, .02, .03, .04, 0.05, 0.5, 0.6, 0.07]])
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[0] + [1] * 13]),
              "video_grid_thw": torch.tensor([[2, 4, 4]]), "image_grid_thw": torch.tensor([[1, 2, 4]])}
    [r] = shares(a, inputs, V, I, maps=True)
    assert r["video"] == pytest.approx([1.0, 0.1]) and torch.allclose(torch.tensor(r["video_maps"][0]), torch.tensor([[.1, .2], [.3, .4]]))
    assert r["image"] == pytest.approx(1.1) and torch.allclose(torch.tensor(r["image_map"]), torch.tensor([[0.5, 0.6]]))
    assert r["text"] == pytest.approx(0.01 + 0.05 + 0.07)                # position 0 is padding


def test_eager_attention_is_restored_and_hooks_removed_even_on_error(tiny):
    processor, model, policy, inputs, eos = setup(tiny, "qwen2_vl")
    text = policy.inner.language_model
    before = text.config._attn_implementation

    def broken(*args, **kwargs):
        assert text.config._attn_implementation == "eager"
        raise RuntimeError("out of memory")
    policy.logprobs = broken
    ids = torch.ones(3, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="out of memory"):
        prompt_attention(policy, inputs, ids, torch.ones_like(ids))
    assert text.config._attn_implementation == before
    assert not any(layer.self_attn._forward_hooks for layer in text.layers)


def test_measures_by_hand():
    """video [0.1, 0.1, 0.2], image 0.3: visual 0.7, video 0.4; v = [1/4, 1/4, 1/2]: entropy (2 x 1/4 ln 4
    + 1/2 ln 2) / ln 3 = 1.039721 / 1.098612 = 0.946395; every grid >= 1/6: coverage 1. [0.4, 0, 0]:
    evenness 0, coverage 1/3."""
    m = measures({"video": [0.1, 0.1, 0.2], "image": 0.3, "text": 0.1})
    assert m["visual"] == pytest.approx(0.7) and m["video"] == pytest.approx(0.4)
    assert m["evenness"] == pytest.approx((0.5 * math.log(4) + 0.5 * math.log(2)) / math.log(3)) and m["coverage"] == 1
    m = measures({"video": [0.4, 0.0, 0.0], "image": None, "text": 0.1})
    assert m["evenness"] == 0 and m["coverage"] == pytest.approx(1 / 3) and m["visual"] == pytest.approx(0.4)
    assert measures({"video": [], "image": 0.2, "text": 0.5})["video"] is None


def test_evaluate_with_attention(tiny, tmp_path):
    """evaluate.py --attention true: one record a question on the very tokens it generated, the three shares
    within the prompt's mass, a table by column with intervals, one picture for each split's first
    question, a rerun with other attention settings refused, and --compare's paired differences."""
    import json
    import evaluate
    from sbr.provenance import ProvenanceError
    cfg = evaluate.Config(model=os.path.join(tiny, "qwen2_vl"), data_root=os.path.join(tiny, "data"), out_dir=str(tmp_path),
                          max_new_tokens=4, batch_size=3, num_workers=0, levels=["L1", "L3"], attention=True,
                          attention_tokens="all", attention_examples=1)
    results = evaluate.main(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "attention.jsonl")]
    predictions = {(r["level"], r["sample_id"]): r for s in ("L1", "L3") for r in map(json.loads, open(tmp_path / f"predictions_{s}.jsonl"))}
    assert len(rows) == len(predictions) == 16
    for r in rows:
        assert r["correct"] == predictions[(r["split"], r["sample_id"])]["correct"] and r["tokens"] == len(r["completion_ids"])
        assert 0 < sum(r["video"]) + (r["image"] or 0) + r["text"] <= 1 + 1e-5
    assert sum("video_maps" in r for r in rows) == sum(bool(r["video"]) for r in rows[:1] + rows[8:9])
    tab = results["attention"]
    assert tab["L1"]["questions"] == 8 and tab["L3 overall"]["questions"] == 8
    mean, lo, hi = tab["L1"]["visual"]
    assert lo <= mean <= hi and "Where the reasoning looks" in open(tmp_path / "results.md").read()
    assert sorted(os.listdir(tmp_path / "attention_examples")) == ["L1_%s.png" % rows[0]["sample_id"],
                                                                   "L3_%s.png" % rows[8]["sample_id"]]
    with pytest.raises(ProvenanceError, match="--attention_layers and --attention_tokens"):
        evaluate.main(evaluate.Config(**{**cfg.__dict__, "attention_tokens": "think"}))
    text = evaluate.main(evaluate.Config(compare=[str(tmp_path), str(tmp_path)]))["comparison"]
    assert "Where the reasoning looks" in text and "| L1 | 8 | +0.000 (+0.000 to +0.000)" in text
    other = tmp_path.parent / (tmp_path.name + "_think")                   # measured otherwise: refused
    results = evaluate.main(evaluate.Config(**{**cfg.__dict__, "out_dir": str(other), "attention_tokens": "think",
                                               "attention_examples": 0, "levels": ["L1"]}))
    assert results["attention"]["L1"]["fallback"] == 8                     # no <think> block: all tokens, counted
    with pytest.raises(ValueError, match="other settings"):
        evaluate.main(evaluate.Config(compare=[str(tmp_path), str(other)], compare_common=True))
