"""Flags are checked before anything heavy loads, with messages naming the flag and what it accepts."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

import evaluate
import train_grpo
import train_sft
from sbr import cli
from sbr.common import ConfigError, UserError


@pytest.mark.parametrize("argv, words", [
    (["--questions_per_rank", "0"], "--questions_per_rank 0: expected >= 1"),
    (["--beta", "-1"], "--beta -1.0: expected >= 0"),
    (["--max_steps", "-3"], "--max_steps -3: expected >= 0"),
    (["--num_generations", "1"], "--num_generations 1: expected >= 2"),
    (["--loss_type", "foo"], "--loss_type foo: expected one of grpo, bnpo, dr_grpo, dapo"),
    (["--reward_funcs", "accuracy", "nope"], "--reward_funcs accuracy nope: expected names from"),
    (["--top_p", "1.5", "--temperature", "0"], "--temperature 0.0: expected > 0"),   # both reported at once
    (["--frame_size", "250"], "--frame_size 250: qwen2_vl frames must be multiples of 28 pixels (patch x merge); use 224 or 252"),
    (["--lr", "1e-5"], "unknown flag --lr (did you mean --learning_rate"),        # no prefix matching
    (["--learning_rate", "-1e-5"], "--learning_rate -1e-05: expected > 0"),         # a negative is a value
    (["--learning_rate", "x"], "--learning_rate x: expected a number"),
    (["--model", "runs/nope/export"], "--model: not found: runs/nope/export"),
    (["--model", "nope_dir/export"], "--model: not found"),                          # not a hub id either
    (["--reward_module", "nope/my_rewards.py"], "--reward_module nope/my_rewards.py: no such file"),
    (["--reward_module", "no_such_rewards"], "no module of that name importable from here (a file path works too"),
    (["--reference", "moving"], "--reference moving: expected one of frozen, ema"),
    (["--ema_decay", "1.5"], "--ema_decay 1.5: expected <= 1"),
    (["--consistency_bonus", "0.5", "--reward_funcs", "format"], "--consistency_bonus: GRPO-CARE's bonus goes to accurate completions"),
    (["--lora_rank", "-2"], "--lora_rank -2: expected 0 (full fine-tuning) or a rank >= 1"),
    (["--lora_rank", "8", "--lora_targets", "q_proj", "qproj"], "--lora_targets qproj: not a layer of the language model"),
    (["--export_peft", "true"], "--export_peft true writes LoRA adapters: add --lora_rank"),
    (["--offload", "disk"], "--offload disk: expected one of none, params"),
    (["--offload", "params", "--load", "full"], "--offload params needs --load sharded"),
    (["--lora_rank", "8", "--reference", "ema"], "--reference ema with --lora_rank"),
])
def test_train_grpo_flags(argv, words, capsys):
    with pytest.raises(UserError) as e:
        train_grpo.check_config(cli.parse(train_grpo.Config, argv, preset=train_grpo.preset))
    assert words in str(e.value), e.value
    if "--top_p" in argv:
        assert "--top_p 1.5: expected <= 1" in str(e.value)


def test_hub_ids_and_folders_pass(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    train_grpo.check_config(train_grpo.Config(model=str(tmp_path)))
    monkeypatch.delenv("HF_HUB_OFFLINE")                  # online, a well-formed hub id is left to the hub
    train_grpo.check_config(train_grpo.Config(model="Qwen/Qwen2-VL-7B-Instruct"))


def test_an_empty_or_weightless_model_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"--model {tmp_path}: a folder with no config.json and no")):
        evaluate.check_config(evaluate.Config(model=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"a folder with no weights \(\*.safetensors\).*--resume true"):
        train_sft.check_config(train_sft.Config(model=str(tmp_path)))


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


@pytest.mark.parametrize("script", [train_grpo, train_sft])
def test_the_preset_is_decided_from_the_parsed_flags_not_their_spelling(script):
    real = script.Config()                                 # what a run on a real model starts from
    for argv in (["--model=Qwen/Qwen2-VL-7B-Instruct"], ["--model", "Qwen/Qwen2-VL-7B-Instruct"]):
        cfg = cli.parse(script.Config, argv, preset=script.preset)
        assert cfg.model == "Qwen/Qwen2-VL-7B-Instruct"
        assert (cfg.learning_rate, cfg.overwrite, cfg.out_dir) == (real.learning_rate, False, real.out_dir)
    tiny = cli.parse(script.Config, [], preset=script.preset)
    assert tiny == getattr(script, "demo_config", script.tiny_config)() and tiny.overwrite   # clears its own folder
    mine = cli.parse(script.Config, ["--out_dir=runs/mine"], preset=script.preset)
    assert mine.learning_rate == tiny.learning_rate and not mine.overwrite   # ... and no folder the user named
    assert cli.parse(script.Config, ["--out_dir", "runs/mine", "--overwrite"], preset=script.preset).overwrite


def test_flag_spellings_lists_and_values():
    cfg = cli.parse(train_grpo.Config, ["--reward_funcs", "accuracy", "format", "--resume", "--beta=0",
                                        "--epsilon_low", "-.5", "--export=false", "--max_steps", "3"])
    assert cfg.reward_funcs == ["accuracy", "format"] and cfg.resume and cfg.beta == 0.0
    assert cfg.epsilon_low == -0.5 and cfg.export is False and cfg.max_steps == 3
    for argv, words in ((["--resume", "maybe"], "--resume maybe: expected true or false"),
                        (["--max_steps", "1.5"], "--max_steps 1.5: expected a whole number"),
                        (["--beta"], "--beta: expected a value"),
                        (["3"], "unexpected value '3'"),
                        (["--beta", "1", "2"], "unexpected value '2' after --beta"),
                        (["--overwirte"], "unknown flag --overwirte (did you mean --overwrite?)")):
        with pytest.raises(cli.UsageError, match=re.escape(words)):
            cli.parse(train_grpo.Config, argv)


def test_help_shows_each_flags_comment_default_and_group(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(train_grpo.Config, ["--help"], preset=train_grpo.preset)
    out = capsys.readouterr().out
    assert e.value.code == 0
    lines = out.splitlines()
    assert "GRPO (the paper's recipe):" in lines and "optimisation:" in lines
    beta = next(line for line in lines if line.lstrip().startswith("--beta "))
    assert "[0.1]" in beta and "KL coefficient" in beta
    bonus = next(line for line in lines if line.lstrip().startswith("--consistency_bonus "))
    assert "at least as likely" in bonus                 # a comment continued on the next source line
    assert lines.index("GRPO (the paper's recipe):") < lines.index(beta) < lines.index("optimisation:")
    lr = next(line for line in lines if line.lstrip().startswith("--learning_rate "))     # a field with no comment
    assert lines.index("optimisation:") < lines.index(lr) < lines.index("system:")
    assert "--learning_rate 0.0005" in lines[-1]         # how the tiny default differs


def test_a_user_error_is_one_line_and_exit_status_2_with_no_traceback():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv, words in ((["--lr", "1e-5"], "error: unknown flag --lr (did you mean --learning_rate"),
                        (["--model", "runs/nope/export"], "error: --model: not found: runs/nope/export")):
        p = subprocess.run([sys.executable, "train_grpo.py", *argv], cwd=here, env=env, capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.startswith(words), p.stderr
        assert "Traceback" not in p.stderr and "[rank0]" not in p.stderr and len(p.stderr.splitlines()) <= 2


def test_a_user_error_from_a_dataloader_worker_is_its_own_message():
    """torch rebuilds a worker's exception from its whole traceback; the one line printed is the original."""
    from torch._utils import ExceptionWrapper
    from sbr.data import DataError
    try:
        raise DataError("a.jsonl", 3, "video_basename", "v.mp4: cannot read video")
    except DataError:
        wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(DataError) as e:
        wrapped.reraise()
    assert "Original Traceback" in str(e.value)
    assert cli.message(e.value) == "a.jsonl:3: field 'video_basename': v.mp4: cannot read video"
