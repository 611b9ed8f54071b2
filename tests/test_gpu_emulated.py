"""The GPU path's conditions, emulated on the CPU: a patched CUDA capability check and a stub flash-attn."""
import os
import sys
import types
from dataclasses import replace

import pytest
import torch

from sbr.common import choose_attention


def fake_gpu(monkeypatch, capability=(8, 0), flash=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn") if flash else None)


def test_flash_attention_only_for_half_precision_compute_on_ampere_or_newer(monkeypatch):
    assert choose_attention(torch.bfloat16) == ("sdpa", "no CUDA device")
    fake_gpu(monkeypatch, (8, 0))
    assert choose_attention(torch.bfloat16) == ("flash_attention_2", "bfloat16 compute, compute capability 8.0")
    assert choose_attention(torch.float16)[0] == "flash_attention_2"
    name, why = choose_attention(torch.float32)                   # flash-attn raises on fp32 inputs
    assert name == "sdpa" and "this run computes in float32" in why
    fake_gpu(monkeypatch, (7, 5))                                 # a T4
    assert choose_attention(torch.bfloat16) == ("sdpa", "flash-attn 2 needs compute capability >= 8.0; this GPU has 7.5")
    fake_gpu(monkeypatch, (9, 0), flash=False)
    assert choose_attention(torch.bfloat16)[1].startswith("flash-attn is not installed")


def test_the_attention_is_chosen_for_the_compute_dtype_not_the_master_weights(tiny, monkeypatch):
    """FSDP2 keeps fp32 master weights and computes in bf16: the trainable policy's attention is picked
    for bf16; an fp32 run's for fp32; evaluation's for the dtype it loads."""
    import sbr.model
    import sbr.sharded
    import sbr.training
    from sbr.training import build_policy
    asked = []
    for module in (sbr.sharded, sbr.model, sbr.training):
        monkeypatch.setattr(module, "attn_implementation", lambda dtype: asked.append(dtype) or "sdpa")
    import torch.distributed as dist
    from sbr.common import init_distributed
    path = os.path.join(tiny, "qwen2_vl")
    init_distributed(always=True)
    try:
        for bf16, load in ((True, "sharded"), (False, "sharded"), (True, "full")):
            build_policy(path, device="cpu", bf16=bf16, suppress=[], chunk=64, trainable=True,
                         activation_checkpointing=False, load=load)
    finally:
        dist.destroy_process_group()
    sbr.model.load_model(path, dtype=torch.bfloat16)
    assert asked == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]


def test_hub_models_download_before_the_process_group_and_collectives_wait_an_hour(monkeypatch, tmp_path):
    """Every rank fetches a hub id's files before any process group exists (no barrier waits on a
    download), and the group's collectives wait --timeout_minutes (60), not NCCL's 10."""
    import datetime
    import huggingface_hub
    import torch.distributed as dist
    import evaluate
    import train_grpo
    calls = []

    class Stop(Exception):
        pass

    def init_process_group(*args, **kwargs):
        calls.append(("process group", kwargs["timeout"]))
        raise Stop
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(("download", repo)))
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    for script in (train_grpo, evaluate):
        monkeypatch.setattr(script, "check_model_path", lambda model, flag="model": None)   # (offline here)
    hub = "Qwen/Qwen2-VL-7B-Instruct"
    with pytest.raises(Stop):
        train_grpo.main(train_grpo.Config(model=hub, timeout_minutes=90))
    monkeypatch.setenv("RANK", "0")                                  # as torchrun starts it
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(Stop):
        evaluate.main(evaluate.Config(model=hub))
    assert calls == [("download", hub), ("process group", datetime.timedelta(minutes=90)),
                     ("download", hub), ("process group", datetime.timedelta(minutes=60))]


@pytest.mark.parametrize("load", ["full", "sharded"])
def test_a_bf16_reference_keeps_fp32_rotary_frequencies(tiny, load):
    """A frozen bf16 reference holds bf16 weights, but its RoPE inv_freq stays fp32 on either loader: a
    bf16 inv_freq turns positions ~900 by up to ~1 rad, another model than the policy's."""
    import torch.distributed as dist
    from sbr.common import init_distributed
    from sbr.training import build_policy
    init_distributed(always=True)
    try:
        for family in ("qwen2_vl", "qwen2_5_vl"):
            ref = build_policy(os.path.join(tiny, family), device="cpu", bf16=True, suppress=[], chunk=64,
                               trainable=False, activation_checkpointing=False, load=load)
            rotary = {name: b.dtype for name, b in ref.named_buffers() if name.endswith("inv_freq")}
            assert rotary and set(rotary.values()) == {torch.float32}, rotary
            assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    finally:
        dist.destroy_process_group()


def test_logits_and_attention_scores_are_never_rounded_to_bf16():
    """bf16 operands, fp32 results: within fp32 error of the exact product, where a bf16 product is off
    by bf16's rounding at |z| ~ 30; the logits' backward is the plain bf16 matmul's, exactly."""
    from sbr.decode import attend
    from sbr.policy import _Logits
    g = torch.Generator().manual_seed(0)
    h, w = (torch.randn(64, 32, generator=g) * 1.2).bfloat16(), (torch.randn(500, 32, generator=g) * 1.2).bfloat16()
    exact = h.double() @ w.double().t()
    z = _Logits.apply(h, w)
    assert z.dtype == torch.float32 and (z.double() - exact).abs().max() < 1e-4
    assert ((h @ w.t()).double() - exact).abs().max() > 0.03                         # what rounding to bf16 costs
    grad = torch.randn(64, 500, generator=g)
    h1, w1, h2, w2 = (t.clone().requires_grad_() for t in (h, w, h, w))
    _Logits.apply(h1, w1).backward(grad)
    (h2 @ w2.t()).float().backward(grad)
    assert torch.equal(h1.grad, h2.grad) and torch.equal(w1.grad, w2.grad)
    # decoding's attention: the scores in fp32 before the softmax
    B, kv, G, r, d, P, S = 1, 1, 2, 1, 16, 40, 3
    q, pk, pv = (torch.randn(*shape, generator=g).bfloat16() * 3 for shape in
                 ((B, kv, G, r, d), (B, kv, P, d), (B, kv, P, d)))
    ok, ov = torch.randn(B, kv, G, S, d, generator=g).bfloat16() * 3, torch.randn(B, kv, G, S, d, generator=g).bfloat16()
    out = attend(q, pk, pv, None, ok, ov, None, d ** -0.5).double()
    k = torch.cat([pk[:, :, None].expand(B, kv, G, P, d), ok], dim=3).double()
    v = torch.cat([pv[:, :, None].expand(B, kv, G, P, d), ov], dim=3).double()
    ref = torch.softmax(q.double() @ k.transpose(-1, -2) * d ** -0.5, -1).bfloat16().double() @ v
    assert (out - ref).abs().max() < 0.05


def test_a_trainer_leaves_a_process_group_it_did_not_make(tiny, tmp_path):
    """bench/gpu_check.py runs several GRPO runs in one process group: re-creating NCCL's right after
    destroying it is a known race. A trainer joins a group that exists and leaves it standing."""
    import torch.distributed as dist
    import train_grpo
    from sbr.common import init_distributed
    init_distributed(always=True)
    try:
        cfg = replace(train_grpo.tiny_config(), model=os.path.join(tiny, "qwen2_vl"), data_root=os.path.join(tiny, "data"),
                      out_dir=str(tmp_path / "run"), max_steps=1, max_completion_length=8, export=False)
        train_grpo.main(cfg)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    train_grpo.main(replace(cfg, out_dir=str(tmp_path / "own")))          # its own group: made and left
    assert not dist.is_initialized()


@pytest.mark.slow
def test_gpu_check_runs_on_two_ranks_with_one_process_group(tmp_path):
    import json
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                          "bench/gpu_check.py", "--presets", "tiny", "--steps", "2", "--new_tokens", "8",
                          "--compile_decode", "false", "--out", str(tmp_path)], cwd=root, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["world_size"] == 2 and figures["presets"]["tiny"]["logprob_ok"]
    assert figures["offload_optimizer"]["offload_max_abs_diff"] == 0           # the CPU: AdamW's own path


def test_deterministic_sets_flash_attn_torch_and_cublas_and_a_step_still_runs(tiny, tmp_path, monkeypatch):
    import train_grpo
    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = replace(train_grpo.tiny_config(), model=os.path.join(tiny, "qwen2_vl"), data_root=os.path.join(tiny, "data"),
                  out_dir=str(tmp_path / "run"), max_steps=1, max_completion_length=8, export=False, deterministic=True)
    try:
        [step] = train_grpo.main(cfg)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1" and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert all(v == v for v in step.values())
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_compiled_decoding_on_an_fsdp2_policy_on_two_ranks(tiny, tmp_path):
    """train_grpo.main with --compile_decode true on two gloo ranks (tests/compiled_fsdp.py): the real
    compiled step, and CUDA graphs emulated around the eager static step, where a replay that would read
    an address other than its recording's fails. Both give the same run; a rollout whose weights FSDP2
    moved frees the earlier recording and records again (one recording alive a bucket)."""
    import json
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29549",
                          "tests/compiled_fsdp.py", tiny, str(tmp_path)], cwd=root, capture_output=True, text=True,
                         timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    for compiled, graphs in zip(r["compiled"], r["graphs"], strict=True):
        assert compiled["completion_length"] == graphs["completion_length"] and compiled["reward"] == graphs["reward"]
        assert abs(compiled["loss"] - graphs["loss"]) < 1e-4
    recordings = [m["decode_recordings"] for m in r["graphs"]]
    assert recordings[0] == 1 and r["captured"] == sum(recordings) and r["freed"] == r["captured"] - 1
    # FSDP2's all-gathers put the weights elsewhere after each training step (on the CPU too, here): each
    # such rollout recorded its graph again, and only then
    assert r["invalidations"] >= 1 and r["captured"] == 1 + r["invalidations"]


def test_the_cuda_allocator_gets_expandable_segments_unless_the_user_configured_it(monkeypatch):
    from sbr.common import init_distributed
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")                   # so that the test's changes are undone after it
        monkeypatch.delenv(name)
    applied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)     # CUDA already started: set at run time
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", applied.append, raising=False)
    init_distributed()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and applied == ["expandable_segments:True"]
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")  # the user's own setting wins
    init_distributed()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and len(applied) == 1


def test_evaluation_loads_the_model_on_its_device_with_no_host_copy(tiny, tmp_path, monkeypatch):
    """Each rank's evaluation model is allocated on its device and filled tensor by tensor from the
    files (sbr.sharded.load_on_device), never through from_pretrained's whole host copy (8 x 16.6 GB at
    7B); it equals from_pretrained's model bit for bit, fp32 rotary frequencies included, both families."""
    from transformers import AutoModelForImageTextToText
    import evaluate
    from sbr.model import load_model
    from sbr.sharded import load_on_device
    for family in ("qwen2_vl", "qwen2_5_vl"):
        path = os.path.join(tiny, family)
        ref, ours = load_model(path, dtype=torch.bfloat16), load_on_device(path, dtype=torch.bfloat16, device="cpu")
        a = {**ref.state_dict(), **dict(ref.named_buffers())}        # buffers: the non-persistent inv_freq too
        b = {**ours.state_dict(), **dict(ours.named_buffers())}
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        assert {b[k].dtype for k in b if k.endswith("inv_freq")} == {torch.float32}
        assert type(ours) is type(ref) and ours.config._attn_implementation == ref.config._attn_implementation

    def host_copy(*args, **kwargs):
        raise AssertionError("from_pretrained: the whole checkpoint in host memory first")
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", host_copy)
    results = evaluate.main(evaluate.Config(model=os.path.join(tiny, "qwen2_vl"), data_root=os.path.join(tiny, "data"),
                                            out_dir=str(tmp_path), max_new_tokens=4, batch_size=4, num_workers=0,
                                            levels=["L1"], dtype="bfloat16"))
    assert results["table"]["L1"]["questions"] == 8
