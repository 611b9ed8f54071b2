"""Flags are checked before anything heavy loads, with messages naming the flag and what it accepts."""
import time

import pytest
import torch.distributed as dist

import evaluate
import train_grpo
import train_sft
from sbr.common import ConfigError, parse_cli


@pytest.mark.parametrize("argv, words", [
    (["--questions_per_rank", "0"], "--questions_per_rank 0: expected >= 1"),
    (["--beta", "-1"], "--beta -1.0: expected >= 0"),
    (["--max_steps", "-3"], "--max_steps -3: expected >= 0"),
    (["--num_generations", "1"], "--num_generations 1: expected >= 2"),
    (["--loss_type", "foo"], "--loss_type foo: expected one of grpo, bnpo, dr_grpo, dapo"),
    (["--reward_funcs", "accuracy", "nope"], "--reward_funcs accuracy nope: expected names from"),
    (["--top_p", "1.5", "--temperature", "0"], "--temperature 0.0: expected > 0"),   # both reported at once
    (["--frame_size", "250"], "--frame_size 250: expected a multiple of 28"),
    (["--lr", "1e-5"], "unrecognized arguments: --lr 1e-5"),                       # no prefix matching
    (["--model", "runs/nope/export"], "--model: not found: runs/nope/export"),
    (["--model", "nope_dir/export"], "--model: not found"),                          # not a hub id either
    (["--reference", "moving"], "--reference moving: expected one of frozen, ema"),
    (["--ema_decay", "1.5"], "--ema_decay 1.5: expected <= 1"),
    (["--consistency_bonus", "0.5", "--reward_funcs", "format"], "--consistency_bonus: GRPO-CARE's bonus goes to accurate completions"),
])
def test_train_grpo_flags(argv, words, capsys):
    with pytest.raises(SystemExit):
        parse_cli(train_grpo.Config, argv, check=train_grpo.check_config)
    err = capsys.readouterr().err
    assert words in err, err
    if "--top_p" in argv:
        assert "--top_p 1.5: expected <= 1" in err


def test_hub_ids_and_folders_pass(tmp_path, monkeypatch):
    train_grpo.check_config(train_grpo.Config(model=str(tmp_path)))
    monkeypatch.delenv("HF_HUB_OFFLINE")                  # online, a well-formed hub id is left to the hub
    train_grpo.check_config(train_grpo.Config(model="Qwen/Qwen2-VL-7B-Instruct"))


def test_main_refuses_bad_flags_before_loading_anything():
    start = time.time()
    with pytest.raises(ConfigError, match="--questions_per_rank"):
        train_grpo.main(train_grpo.Config(questions_per_rank=0))
    with pytest.raises(ConfigError, match="--micro_batch_size"):
        train_sft.main(train_sft.Config(micro_batch_size=0))
    with pytest.raises(ConfigError, match="--levels L4"):
        evaluate.main(evaluate.Config(levels=["L4"]))
    with pytest.raises(ConfigError, match="--data_root: not found"):
        evaluate.main(evaluate.Config(data_root="/no/such/root"))
    assert time.time() - start < 5 and not dist.is_initialized()
