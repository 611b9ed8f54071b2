"""The CPU-scale reproduction end to end, in its seconds-long version (SMALL=1): synthetic data in
SEED-Bench-R1's layout, format warm-up, SFT and GRPO from the same start, evaluate.py on all three."""
import json
import os
import subprocess

import pytest

from sbr.data import load_seedbench, load_sft
from sbr.synth import NEW_STYLES, TRAIN_OBJECTS, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthetic_benchmark_hierarchy(tmp_path):
    root = build(str(tmp_path / "data"), train=16, val=8)
    ann = os.path.join(root, "annotations")
    l1, l2, l3 = (load_seedbench(os.path.join(ann, f"validation_L{k}.jsonl"), root) for k in (1, 2, 3))
    train = load_seedbench(os.path.join(ann, "training_6k.jsonl"), root)
    goal = lambda s: s.question.rsplit(" ", 1)[-1].rstrip("?")
    assert {goal(s) for s in l1} <= set(TRAIN_OBJECTS) and {goal(s) for s in l2} <= set(TRAIN_OBJECTS)
    assert not {goal(s) for s in l3} & set(TRAIN_OBJECTS)                      # L3: unseen procedures
    assert sorted({s.domain for s in l3}) == ["Daily life", "Hobbies", "Recreation", "Work"]
    for s in train + l1 + l2 + l3:                                             # options: one procedure's steps
        assert len({o.split(" ", 1)[1] for o in s.options}) == 1 and s.options["ABCD".index(s.answer)] in s.options
    records = [json.loads(line) for line in open(os.path.join(ann, "validation_L2.jsonl"))]
    assert all(r["video_source"] == "Synth" for r in records)
    assert len(load_sft(os.path.join(ann, "training_with_cot_6k.jsonl"), root)) == 16
    assert len(NEW_STYLES) == 2


@pytest.mark.slow
def test_small_reproduction_prints_the_side_by_side_table(tmp_path):
    run = subprocess.run(["bash", "launch/repro_cpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "SMALL": "1", "OUT": str(tmp_path), "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    table = open(tmp_path / "table.md").read()
    for row in ("| Vanilla (warm-up) |", "| SFT |", "| GRPO |", "| questions | 8 | 8 | 2 | 2 | 2 | 2 | 8 |"):
        assert row in table
    for run_dir in ("warmup", "sft", "grpo"):
        assert os.path.exists(tmp_path / run_dir / "export" / "model.safetensors")
