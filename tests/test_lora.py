"""LoRA (sbr/lora.py) on the tiny models: B = 0 is the base model exactly; switched off it is the base
model whatever A and B hold; the merged weights give the adapted model's log-probs; only adapters
train; the decode step applies them (greedy rollout = generate() of the merged model)."""
import os

import pytest
import torch

from sbr import lora
from sbr.rollout import sample
from test_policy import setup


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
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
    merged = lora.merged_state_dict(model.state_dict(), lora.scales(model), torch.float32)
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
    assert list(lora.scales(model)) == names
    config, tensors = lora.peft_files(model.state_dict(), lora.scales(model), "base")
    assert config["target_modules"] == names and config["r"] == 4 and config["lora_alpha"] == 8
    assert len(tensors) == 2 * len(names) and not any("visual" in k for k in tensors)
    q = next(n for n in names if n.endswith("q_proj"))
    mod = model.get_submodule(q)
    assert tensors[f"base_model.model.{q}.lora_A.weight"].shape == (4, mod.in_features)
    assert tensors[f"base_model.model.{q}.lora_B.weight"].shape == (mod.out_features, 4)
    assert any(n.endswith("gate_proj") for n, _ in lora.targets(model, vision=True) if "visual" in n)


# ---------------------------------------------------------------------------- in the trainers
@pytest.mark.parametrize("bf16", [False, True])
def test_a_sharded_lora_policy_its_reference_and_its_export(tiny, tmp_path, bf16):
    """build_policy with LoRA: the base frozen (bf16 when computing in bf16), fp32 adapters drawn as
    lora.add draws them on a plain model (whatever the sharding); the reference with adapters off equals
    a separately built frozen base model, bit for bit; the export merges them (its log-probs equal the
    adapted policy's, fp32, within 1e-5) and writes the PEFT files."""
    import json
    import torch.distributed as dist
    from safetensors.torch import load_file
    from sbr import checkpoint
    from sbr.common import init_distributed
    from sbr.model import load_model, load_processor
    from sbr.policy import Policy
    from sbr.training import build_policy, trainable
    path = os.path.join(tiny, "qwen2_vl")
    processor, plain, _, inputs, _ = setup(tiny, "qwen2_vl")
    lora.add(plain, rank=4, alpha=8, seed=3)
    init_distributed(always=True)
    try:
        policy = build_policy(path, device="cpu", bf16=bf16, suppress=[], chunk=64, trainable=True,
                              activation_checkpointing=False, lora=dict(rank=4, alpha=8, seed=3))
        reference = build_policy(path, device="cpu", bf16=bf16, suppress=[], chunk=64, trainable=False,
                                 activation_checkpointing=False)
        base = {p.dtype for n, p in policy.named_parameters() if not lora.is_adapter(n)}
        assert base == {torch.bfloat16 if bf16 else torch.float32}
        assert {p.dtype for p in trainable(policy)} == {torch.float32}
        assert {n for n, p in policy.named_parameters() if p.requires_grad} == \
            {"model." + n for n, _ in plain.named_parameters() if lora.is_adapter(n)}
        drawn = dict(plain.named_parameters())
        assert all(torch.equal(p.full_tensor(), drawn[n.removeprefix("model.")]) for n, p in policy.named_parameters()
                   if n.endswith("lora_A"))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in lora.adapted(policy.model):               # a trained adapter: B != 0
                m.lora_B.to_local().copy_(torch.randn(m.lora_B.to_local().shape, generator=gen) * 0.3)
        ids = torch.randint(10, 60, (6, 5))
        with torch.no_grad():
            adapted, _ = policy.logprobs(inputs, ids, 2)
            base_lp, _ = lora.Base(policy).logprobs(inputs, ids, 2)
            separate, _ = reference.logprobs(inputs, ids, 2)
        assert torch.equal(base_lp, separate)                  # adapters off = the base model, to the bit
        assert (adapted - base_lp).abs().max() > 1e-3
        if bf16:
            return
        checkpoint.export(str(tmp_path / "export"), policy, processor, torch.float32, adapter_of=path)
    finally:
        dist.destroy_process_group()
    exported = Policy(load_model(str(tmp_path / "export")), suppress_token_ids=[], chunk_size=64)
    assert not any("lora" in k for k in load_file(tmp_path / "export" / "model.safetensors"))
    with torch.no_grad():
        folded, _ = exported.logprobs(inputs, ids, 2)
    assert torch.allclose(folded, adapted, atol=1e-5), (folded - adapted).abs().max()
    config = json.load(open(tmp_path / "export" / "adapter" / "adapter_config.json"))
    tensors = load_file(tmp_path / "export" / "adapter" / "adapter_model.safetensors")
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == path
    for n, p in policy.model.named_parameters():
        if lora.is_adapter(n):
            module, which = n.rsplit(".", 1)
            assert torch.equal(tensors[f"base_model.model.{module}.{which}.weight"], p.full_tensor())
    load_processor(str(tmp_path / "export"))                   # a whole folder


def dcp_keys(path) -> set:
    from torch.distributed.checkpoint import FileSystemReader
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def test_lora_grpo_on_two_ranks_in_bf16_moves_only_adapters_and_resumes_exactly(tiny, tmp_path):
    """train_grpo.py with LoRA under torchrun, 2 ranks, FSDP2 with bf16 mixed precision: a checkpoint holds
    the adapters and their AdamW state only; the export's weights are the base's (bf16, as the frozen base
    is held) except where adapted; killed after step 2's checkpoint and resumed with --offload optimizer
    (sbr/offload.py: DTensor state with host shards, loaded from DCP), the run is the same."""
    import json
    import subprocess
    import sys
    from safetensors.torch import load_file
    from test_train_grpo import ROOT, cli, tiny_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, kill in (("straight", None), ("resumed", "save:renamed@2")):
        cfg = tiny_run(tiny, tmp_path / name, questions_per_rank=1, dtype="bfloat16", lora_rank=4, lora_alpha=8,
                       learning_rate=1e-2, activation_checkpointing=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29561 + len(runs)), "train_grpo.py", *cli(cfg)]
        if kill:
            died = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                                  env={**env, "SBR_KILL_AT": kill})
            assert died.returncode != 0 and (tmp_path / name / "checkpoints" / "step_0000002").is_dir()
            cmd += ["--resume", "true", "--offload", "optimizer"]     # the same checkpoint, AdamW's state on the host
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
        assert run.returncode == 0, (name, [x for x in run.stderr.splitlines() if "Error" in x][:5])
        assert "LoRA r=4" in run.stdout and "π_ref = the base" in run.stdout
        runs[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    assert "resumed from" in run.stdout and "--offload optimizer: the AdamW state" in run.stdout
    assert [r["step"] for r in runs["resumed"]] == [1, 2, 3, 4]
    for a, b in zip(runs["straight"], runs["resumed"]):
        assert all(a[k] == b[k] for k in ("loss", "reward", "kl", "grad_norm")), (a, b)
    assert runs["straight"][-1]["kl"] > 0                        # the adapters moved the policy off the base
    keys = dcp_keys(tmp_path / "straight" / "checkpoints" / "step_0000004")
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all(lora.is_adapter(k) for k in model_keys)
    assert all(".lora_" in k for k in keys if k.startswith("optim.state"))
    one = load_file(tmp_path / "straight" / "export" / "model.safetensors")
    two = load_file(tmp_path / "resumed" / "export" / "model.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)
    start = load_file(os.path.join(tiny, "qwen2_vl", "model.safetensors"))
    moved = {k for k in start if not torch.equal(one[k], start[k].to(torch.bfloat16).float())}
    assert moved and moved <= {k for k in start if k.rsplit(".", 2)[-2] in lora.TARGETS and "visual" not in k}


def test_sft_with_lora_and_cpu_offload(tiny, tmp_path):
    """train_sft.py takes the same options: offloading the shards (full fine-tuning and LoRA) or AdamW's
    state to the host changes no number; a LoRA checkpoint holds the adapters only, and the export has them merged,
    with the PEFT files beside."""
    import train_sft
    from test_sft import sft_run
    runs = {}
    for rank, offload in ((0, "none"), (0, "params"), (0, "optimizer"), (4, "none"), (4, "params")):
        out = tmp_path / f"r{rank}_{offload}"
        runs[rank, offload] = train_sft.main(sft_run(tiny, out, lora_rank=rank, offload=offload, export_peft=bool(rank)))
    for rank, offload in ((0, "params"), (0, "optimizer"), (4, "params")):
        assert [h["loss"] for h in runs[rank, "none"]] == [h["loss"] for h in runs[rank, offload]]
    assert runs[4, "none"][-1]["loss"] != runs[0, "none"][-1]["loss"]
    model_keys = {k for k in dcp_keys(tmp_path / "r4_none" / "checkpoints" / "step_0000003") if k.startswith("model.")}
    assert model_keys and all(lora.is_adapter(k) for k in model_keys)
    assert (tmp_path / "r4_params" / "export" / "adapter" / "adapter_model.safetensors").is_file()
