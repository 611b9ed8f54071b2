"""LoRA (sbr/lora.py) on the tiny models: B = 0 is the base model exactly; switched off it is the base
model whatever A and B hold; the merged weights give the adapted model's log-probs; only adapters
train; the decode step applies them (greedy rollout = generate() of the merged model)."""
import pytest
import torch

from sbr import lora
from sbr.rollout import sample
from test_policy import setup


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_lora_is_exact_at_zero_off_and_merged(tiny, family):
    processor, model, policy, inputs, eos = setup(tiny, family)
    out = sample(policy, inputs, 2, max_new_tokens=6, eos_token_ids=[-1], pad_token_id=0,
                 generators=[torch.Generator().manual_seed(i) for i in range(3)])
    ids = out.completion_ids
    with torch.no_grad():
        base, _ = policy.logprobs(inputs, ids, 2)
    names = lora.add(model, rank=4, alpha=8, seed=0)
    assert names and not any("visual" in n for n in names)                  # the language model only
    assert all(n.rsplit(".", 1)[-1] in lora.TARGETS for n in names)
    with torch.no_grad():
        at_zero, _ = policy.logprobs(inputs, ids, 2)
    assert torch.equal(at_zero, base)                                       # B = 0: the base model, bit for bit
    gen = torch.Generator().manual_seed(1)
    for m in lora.adapted(model):                                           # a trained adapter
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=gen) * 0.2
    with torch.no_grad():
        adapted, _ = policy.logprobs(inputs, ids, 2)
        with lora.off(model):
            reference, _ = policy.logprobs(inputs, ids, 2)
    assert (adapted - base).abs().max() > 1e-3                              # the adapters act
    assert torch.equal(reference, base)                                     # off: the base model again
    scales = {n: m.lora_scale for n, m in zip(names, lora.adapted(model))}
    merged = lora.merged_state_dict(model.state_dict(), scales, torch.float32)
    assert not any("lora_" in k for k in merged)
    _, copy, copy_policy, _, _ = setup(tiny, family)
    copy.load_state_dict(merged)
    with torch.no_grad():
        folded, _ = copy_policy.logprobs(inputs, ids, 2)
    assert torch.allclose(folded, adapted, atol=1e-5), (folded - adapted).abs().max()     # fp32: rounding only
    greedy = sample(policy, inputs, 1, max_new_tokens=8, eos_token_ids=eos, pad_token_id=0, greedy=True)
    ref = copy.generate(**inputs, max_new_tokens=8, do_sample=False, suppress_tokens=policy.suppress_token_ids)
    ref = ref[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(greedy.completion_ids, ref[:, :greedy.completion_ids.shape[1]])  # decode applies them


def test_only_adapters_get_gradients(tiny):
    processor, model, policy, inputs, eos = setup(tiny, "qwen2_vl")
    lora.add(model, rank=2, alpha=2, seed=0)
    ids = torch.randint(10, 50, (3, 5))
    lp, _ = policy.logprobs(inputs, ids, 1)
    lp.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == trainable and trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with pytest.raises(ValueError, match="--lora_targets nope"):
        lora.add(model, 2, 2, names=("nope",))


def test_peft_layout(tiny):
    """The adapters alone as PEFT writes them: base_model.model.<path>.lora_A.weight (r x in) and
    .lora_B.weight (out x r), targets by full path (Qwen2.5-VL's vision MLP has gate/up/down_proj too)."""
    _, model, _, _, _ = setup(tiny, "qwen2_5_vl")
    names = lora.add(model, rank=4, alpha=8, seed=0)
    config, tensors = lora.peft_files(model.state_dict(), names, 4, 8, "base")
    assert config["target_modules"] == names and config["r"] == 4 and config["lora_alpha"] == 8
    assert len(tensors) == 2 * len(names) and not any("visual" in k for k in tensors)
    q = next(n for n in names if n.endswith("q_proj"))
    mod = model.get_submodule(q)
    assert tensors[f"base_model.model.{q}.lora_A.weight"].shape == (4, mod.in_features)
    assert tensors[f"base_model.model.{q}.lora_B.weight"].shape == (mod.out_features, 4)
    assert any(n.endswith("gate_proj") for n, _ in lora.targets(model, vision=True) if "visual" in n)
