"""Qwen3-VL through sbr's scripts on the tiny random Qwen3-VL (sbr/tiny.py): GRPO on 2 ranks with FSDP2 in
bf16 (sharded loading, DeepStack, q/k norms, timestamps), its export evaluated, SFT, and --frame_size
checked against the family's 32-pixel tiles. The exactness of each part is tested beside the other
families' (test_collate, test_positions, test_policy, test_decode, test_fsdp)."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

import evaluate
import train_grpo
import train_sft
from sbr import cli
from sbr.common import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grpo_on_two_ranks_in_bf16_then_its_export_evaluates(tiny, tmp_path):
    from test_train_grpo import cli as flags, tiny_run
    cfg = replace(tiny_run(tiny, tmp_path / "grpo", max_steps=2, save_every=2, dtype="bfloat16", max_completion_length=12),
                  model=os.path.join(tiny, "qwen3_vl"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29583",
           "train_grpo.py", *flags(cfg)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, [x for x in run.stderr.splitlines() if "Error" in x][:5]
    assert "256 px" in run.stdout                                     # the family's frame size, in the plan
    steps = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert len(steps) == 2 and all(s["grad_norm"] > 0 for s in steps)
    assert all(s["sampling_logp_difference_max"] < 0.2 for s in steps)          # rollout = training forward, bf16
    export = tmp_path / "grpo" / "export"
    results = evaluate.main(evaluate.Config(model=str(export), data_root=os.path.join(tiny, "data"), levels=["L1"],
                                            out_dir=str(tmp_path / "eval"), limit=3, batch_size=3, max_new_tokens=4,
                                            num_workers=0))
    assert results["table"]["L1"]["questions"] == 3
    assert results["provenance"]["identity"]["frames"]["frame_size"] == 256


def test_sft_step_and_frame_size_checks(tiny, tmp_path):
    from test_sft import sft_run
    history = train_sft.main(replace(sft_run(tiny, tmp_path / "sft", max_steps=1, export=False),
                                     model=os.path.join(tiny, "qwen3_vl")))
    assert len(history) == 1 and history[0]["loss"] > 0
    model = os.path.join(tiny, "qwen3_vl")
    with pytest.raises(ConfigError, match=r"--frame_size 252: qwen3_vl frames must be multiples of 32 .*use 224 or 256"):
        train_grpo.check_config(cli.parse(train_grpo.Config, ["--model", model, "--frame_size", "252"]))
    train_grpo.check_config(cli.parse(train_grpo.Config, ["--model", model, "--frame_size", "224"]))
