"""train_grpo.py end to end on the tiny default: one process, two ranks under torchrun, kill and resume."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import evaluate
import train_grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("loss", "reward", "kl", "grad_norm", "completion_length", "entropy")


def tiny_run(tiny, out_dir, **kw):
    kw = {"max_completion_length": 24, "max_steps": 4, "save_every": 2, **kw}
    return replace(train_grpo.tiny_config(), model=os.path.join(tiny, "qwen2_vl"), data_root=os.path.join(tiny, "data"),
                   out_dir=str(out_dir), reward_funcs=["toy_even_length"], reward_module="tests.toy_rewards", **kw)


def cli(cfg) -> list[str]:
    args = []
    for k, v in cfg.__dict__.items():
        args += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return args


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_uninterrupted")
    history = train_grpo.main(tiny_run(tiny, out))
    return out, history


def close(a: dict, b: dict, rel=1e-4, abs=1e-6):
    return all(a[k] == pytest.approx(b[k], rel=rel, abs=abs) for k in COMPARED)


def assert_same_run(metrics_file, history):
    """Step for step, the run in `metrics_file` equals the one-process `history`."""
    rows = [json.loads(line) for line in open(metrics_file)]
    assert len(rows) == len(history)
    for a, b in zip(rows, history):
        assert close(a, b), (a, b)


def test_tiny_grpo_learns_and_writes_everything(uninterrupted, tiny):
    out, history = uninterrupted
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert any(h["loss"] != 0 for h in history) and all(0 < h["reward"] < 1 for h in history)
    assert history[0]["kl"] == pytest.approx(0, abs=1e-6) and history[-1]["kl"] > 0   # the policy moved
    assert all(h["grad_norm"] > 0 for h in history)
    assert history[1]["lr"] < history[0]["lr"]                                        # linear decay
    for name in ("config.json", "metrics.jsonl", "rollouts.jsonl", "checkpoints/step_0000002/meta.json",
                 "checkpoints/step_0000004/meta.json", "export/model.safetensors", "export/processor_config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert open(os.path.join(out, "checkpoints", "latest")).read() == "step_0000004"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    rollout = json.loads(open(os.path.join(out, "rollouts.jsonl")).readline())
    assert len(rollout["completions"]) == 4 and len(rollout["advantages"]) == 4
    # the export loads in transformers and evaluates
    results = evaluate.main(evaluate.Config(model=os.path.join(out, "export"), data_root=os.path.join(tiny, "data"),
                                            out_dir=str(out / "eval"), levels=["L1"], limit=2, max_new_tokens=4,
                                            num_workers=0))
    assert results["table"]["L1"]["questions"] == 2


def test_export_differs_from_the_start_and_matches_training(uninterrupted, tiny):
    from safetensors.torch import load_file
    out, _ = uninterrupted
    before = load_file(os.path.join(tiny, "qwen2_vl", "model.safetensors"))
    after = load_file(os.path.join(out, "export", "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)


@pytest.mark.slow
def test_two_ranks_match_one_process(uninterrupted, tiny, tmp_path):
    """Two ranks with one question each = one process with two questions, step for step (and FSDP2
    with activation checkpointing over the shared-prompt forward = plain autograd)."""
    _, history = uninterrupted
    cfg = tiny_run(tiny, tmp_path, questions_per_rank=1, export=False, activation_checkpointing=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "train_grpo.py", *cli(cfg)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert_same_run(tmp_path / "metrics.jsonl", history)


@pytest.mark.slow
def test_kill_and_resume_continues_with_the_same_losses(uninterrupted, tiny, tmp_path):
    _, history = uninterrupted
    cfg = tiny_run(tiny, tmp_path)
    cmd = [sys.executable, "train_grpo.py", *cli(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)                     # dies somewhere in step 3
    proc.wait()
    assert latest.read_text() == "step_0000002" and not (tmp_path / "export").exists()
    done = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert done[:2] == [1, 2] and 4 not in done

    run = subprocess.run(cmd + ["--resume", "true"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert "resumed from" in run.stdout
    resumed = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-2:]
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, history[2:]):
        assert close(a, b), (a, b)
    assert (tmp_path / "export" / "model.safetensors").exists()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_match_one_process(uninterrupted, tiny, tmp_path):
    """launch/multinode.sh on two 'nodes' of this machine (one rank each), rendezvous on 127.0.0.1."""
    _, history = uninterrupted
    cfg = tiny_run(tiny, tmp_path, questions_per_rank=1, export=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNODES": "2", "NGPU": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RDZV_ID": "sbr-test"}
    nodes = [subprocess.Popen(["bash", "launch/multinode.sh", "train_grpo.py", *cli(cfg)], cwd=ROOT,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outs = [node.communicate(timeout=400) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-3000:] for _, err in outs]
    assert_same_run(tmp_path / "metrics.jsonl", history)


@pytest.mark.slow
def test_hsdp_two_replicas_match_one_process(uninterrupted, tiny, tmp_path):
    """shard_group_size 1 on 2 ranks: a (2 replicas x 1 shard) mesh, gradients all-reduced across."""
    _, history = uninterrupted
    cfg = tiny_run(tiny, tmp_path, questions_per_rank=1, export=False, shard_group_size=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train_grpo.py", *cli(cfg)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    assert_same_run(tmp_path / "metrics.jsonl", history)


def test_question_seeds_never_collide():
    """Every (seed, epoch, index) of the full 50,269-question training set over 3 epochs and 3 seeds gets
    its own stream; the old seed * 1_000_003 + epoch * 7919 + index collided past index 7,919."""
    from sbr.training import question_seed
    seeds = {question_seed(s, e, i) for s in (0, 1, 42) for e in range(3) for i in range(50_269)}
    assert len(seeds) == 3 * 3 * 50_269 and all(0 <= x < 2**63 for x in list(seeds)[:1000])
    assert len({42 * 1_000_003 + e * 7919 + i for e in range(2) for i in range(50_269)}) < 2 * 50_269


def test_all_masked_steps_stay_finite(tiny, tmp_path):
    """mask_truncated with 2-token completions masks (nearly) every completion; with dapo the step's
    normaliser is 0. Loss, gradient norm and weights stay finite, and completion_length reports the
    tokens generated (2 each), not the masked count (0)."""
    import math
    from safetensors.torch import load_file
    history = train_grpo.main(tiny_run(tiny, tmp_path, loss_type="dapo", mask_truncated=True,
                                       max_completion_length=2, max_steps=2, save_every=100))
    for h in history:
        assert all(math.isfinite(v) for v in h.values()), h
        assert 1 <= h["completion_length"] <= 2 and h["truncated"] > 0.5
    weights = load_file(os.path.join(tmp_path, "export", "model.safetensors"))
    assert all(w.float().isfinite().all() for w in weights.values())


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_bf16_grpo_step_and_evaluation_on_the_cpu(tiny, tmp_path, monkeypatch, family):
    """The GPU path's dtypes on the CPU: FSDP2 bf16 mixed precision for a GRPO step (rollout,
    shared-prompt forward, loss) and a bf16 evaluation batch of Qwen2.5-VL. Every mRoPE computation
    must see second_per_grid_ts in fp32 with the collator's values (FSDP2 used to cast it to bf16)."""
    import math
    import sbr.positions
    seen = []
    original = sbr.positions.rope_index

    def recording(*args, **kwargs):
        if kwargs.get("second_per_grid_ts") is not None:
            seen.append(kwargs["second_per_grid_ts"].clone())
        return original(*args, **kwargs)
    monkeypatch.setattr(sbr.positions, "rope_index", recording)
    cfg = replace(tiny_run(tiny, tmp_path, max_steps=1, save_every=100, export=False),
                  model=os.path.join(tiny, family), dtype="bfloat16")
    [step] = train_grpo.main(cfg)
    assert all(math.isfinite(v) for v in step.values()) and step["kl"] == pytest.approx(0, abs=1e-2)
    assert seen and all(s.dtype == torch.float32 for s in seen)
    from sbr.collate import VideoCollator
    from sbr.data import load_seedbench
    from sbr.model import load_processor
    train = load_seedbench(os.path.join(tiny, "data", cfg.train_file), os.path.join(tiny, "data"), seed=cfg.seed)
    collator = VideoCollator(load_processor(cfg.model))
    exact = {round(2 / collator.load(s)["sample_fps"], 6) for s in train if s.video}
    assert {round(float(x), 6) for s in seen for x in s} <= exact       # fp32 values, not bf16-rounded ones

    seen.clear()
    results = evaluate.main(evaluate.Config(model=cfg.model, data_root=os.path.join(tiny, "data"), dtype="bfloat16",
                                            out_dir=str(tmp_path / "eval"), levels=["L1"], limit=3, batch_size=3,
                                            max_new_tokens=4, num_workers=0))
    assert results["table"]["L1"]["questions"] == 3 and results["provenance"]["identity"]["dtype"] == "bfloat16"
    assert seen and all(s.dtype == torch.float32 for s in seen)
