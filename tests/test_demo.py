"""The README's first command shows the point: GRPO raises the accuracy reward of the tiny default's
warmed-up model (sbr/demo.py), and its Table 2 is above chance. The demonstration's build is reused
from runs/tiny/demo when a complete copy of this version is there (CI's first step builds it)."""
import json
import os
from dataclasses import replace

import pytest

import evaluate
import train_grpo
from sbr import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_model_means_the_demonstration():
    cfg = cli.parse(train_grpo.Config, [], preset=train_grpo.preset)
    assert cfg == train_grpo.demo_config() and (cfg.model, cfg.data_root) == ("", "")
    assert (cfg.num_generations, cfg.questions_per_rank, cfg.learning_rate, cfg.beta) == (8, 4, 5e-4, 0.02)
    assert cli.parse(evaluate.Config, ["--model", "runs/grpo_tiny/export"], preset=evaluate.preset).frame_size == 56
    assert cli.parse(evaluate.Config, ["--data_root", "/data/SEED-Bench-R1"], preset=evaluate.preset).frame_size == 0   # the family's


@pytest.mark.slow
def test_the_first_command_shows_grpo_learning(tmp_path, capsys):
    from sbr.demo import ensure_demo
    tiny_dir = os.path.join(ROOT, "runs", "tiny")
    model, data = ensure_demo(tiny_dir)
    history = train_grpo.main(replace(train_grpo.demo_config(), tiny_dir=tiny_dir, out_dir=str(tmp_path / "grpo_tiny")))
    reward = [h["reward"] for h in history]
    first, last = sum(reward[:20]) / 20, sum(reward[-20:]) / 20
    assert len(reward) == train_grpo.DEMO_STEPS and first < 0.35 and last > first + 0.25, (first, last)
    results = evaluate.main(replace(evaluate.demo_config(), model=str(tmp_path / "grpo_tiny" / "export"),
                                    tiny_dir=tiny_dir, out_dir=str(tmp_path / "eval")))
    for level in ("L1", "L2"):                    # the Wilson interval's lower end above chance (25%)
        assert results["table"][level]["ci95"][0] > 25, results["table"][level]
    closing = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert closing.startswith("accuracy: L1 ") and "(chance: 25.0%)" in closing
    assert f"tensorboard --logdir {tmp_path / 'grpo_tiny' / 'tb'}" in closing
    warm = evaluate.main(replace(evaluate.demo_config(), model=model, data_root=data, out_dir=str(tmp_path / "vanilla")))
    assert warm["table"]["L1"]["accuracy"] < results["table"]["L1"]["accuracy"] - 30      # GRPO did it
    assert json.load(open(tmp_path / "grpo_tiny" / "config.json"))["seed"] == 0


def test_rebuilding_the_tiny_default_keeps_the_demonstration(tmp_path):
    from sbr.tiny import OWN, ensure_tiny
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "VERSION").write_text("built")
    (tmp_path / "VERSION").write_text("an older version")             # so ensure_tiny rebuilds its own
    ensure_tiny(str(tmp_path))
    assert (tmp_path / "demo" / "VERSION").read_text() == "built"
    assert sorted(os.listdir(tmp_path)) == sorted([*OWN, "VERSION", "demo"])
