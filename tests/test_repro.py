"""The CPU-scale reproduction end to end, in its seconds-long version (SMALL=1): synthetic data in
SEED-Bench-R1's layout, format warm-up, SFT, GRPO and GRPO-CARE from the same start, evaluate.py on all
four, over two seeds with the mean ± std and paired tables."""
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
def test_small_multi_seed_study_prints_mean_std_and_paired_tables(tmp_path):
    """launch/repro_seeds.sh over one seed of launch/repro_cpu.sh (SMALL; two would double CI's longest
    test, and tests/test_stats.py pools two seeds by hand): vanilla, SFT, GRPO, GRPO-CARE and its two
    parts apart (ABLATE), the side-by-side table, then the mean ± std, consistency, paired and
    seed-by-seed tables, and where the reasoning looks (--attention true)."""
    root = tmp_path / "study"
    run = subprocess.run(["bash", "launch/repro_seeds.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "SMALL": "1", "SEEDS": "0", "ROOT": str(root), "ABLATE": "1",
                              "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for seed in (0,):
        table = open(root / f"seed{seed}" / "table.md").read()
        for row in ("| Vanilla (warm-up) |", "| SFT |", "| GRPO |", "| GRPO-CARE |", "| EMA reference only |",
                    "| bonus only |", "| questions | 8 | 8 | 2 | 2 | 2 | 2 | 8 |"):
            assert row in table
        for run_dir in ("warmup", "sft", "grpo", "care", "care_ema", "care_bonus"):
            assert os.path.exists(root / f"seed{seed}" / run_dir / "export" / "model.safetensors")
    study = open(root / "table.md").read()
    for row in ("| Vanilla (1 seed) |", "| SFT (1 seed) |", "| GRPO (1 seed) |", "| GRPO-CARE (1 seed) |",
                "### GRPO vs SFT", "### GRPO-CARE vs SFT", "### GRPO-CARE vs GRPO", "| L1 | 8 |", "| L3 overall | 8 |",
                "| model | L1-L3 answered | L1-L3 consistent of answered | L3 answered | L3 consistent of answered |",
                "### GRPO-CARE - SFT, seed by seed (points)", "### bonus only - GRPO, seed by seed (points)",
                "| EMA reference only (1 seed) |", "| model | L3, objects of 2 tokens (as some training objects) |",
                "| model, measure (x 100) | L1 | L2 | L3 overall |", "| SFT, visual_of_prompt |",
                "| model - SFT, measure (x 100) | L1 | L2 | L3 overall |", "| GRPO-CARE, evenness |"):
        assert row in study, row
    assert len(os.listdir(root / "seed0" / "eval" / "grpo" / "attention_examples")) == 6     # 2 a split, drawn
    care = [json.loads(line) for line in open(root / "seed0" / "care" / "metrics.jsonl")]
    assert "care/bonus_rate" in care[0]
    flags = {run: json.load(open(root / "seed0" / run / "config.json")) for run in ("care", "care_ema", "care_bonus")}
    assert [(f["reference"], f["consistency_bonus"]) for f in flags.values()] == [("ema", 0.5), ("ema", 0.0), ("frozen", 0.5)]


def test_templated_chains_of_thought_change_only_the_reasoning(tmp_path):
    """--cot_noise 1: every SFT chain's reasoning is a templated sentence, the answer still right; the
    questions, media and every other file are those of the clean build of the same seed."""
    from sbr.synth import TEMPLATED
    clean = build(str(tmp_path / "clean"), train=16, val=4, seed=3)
    noisy = build(str(tmp_path / "noisy"), train=16, val=4, seed=3, cot_noise=1.0)
    read = lambda root, name: [json.loads(line) for line in open(os.path.join(root, "annotations", name))]   # noqa: E731
    for name in ("training_6k.jsonl", "validation_L1.jsonl", "validation_L3.jsonl", "warmup.jsonl"):
        assert read(clean, name) == read(noisy, name), name
    for a, b in zip(read(clean, "training_with_cot_6k.jsonl"), read(noisy, "training_with_cot_6k.jsonl")):
        assert a["prompt"] == b["prompt"] and a["response"].split("<answer>")[1] == b["response"].split("<answer>")[1]
        assert b["response"][len("<think>"):b["response"].index("</think>")] in TEMPLATED


def test_training_questions_vary_in_length_only_when_asked(tmp_path):
    """--vary_length: every training question (and its SFT prompts) ends with one of FILLERS, several
    different ones; the validation files, the answers and the media are the plain build's; without it
    the build and the tokenizer's words are as before (the demonstration's data do not change)."""
    from sbr.synth import FILLERS, QUESTION, words
    plain = build(str(tmp_path / "plain"), train=40, val=4, seed=3)
    varied = build(str(tmp_path / "varied"), train=40, val=4, seed=3, vary_length=True)
    read = lambda root, name: [json.loads(line) for line in open(os.path.join(root, "annotations", name))]   # noqa: E731
    for name in ("validation_L1.jsonl", "validation_L2.jsonl", "validation_L3.jsonl"):
        assert read(plain, name) == read(varied, name), name
    a, b = read(plain, "training_6k.jsonl"), read(varied, "training_6k.jsonl")
    assert all(r["question"].endswith(" the " + r["answer"].split()[-1] + "?") for r in a)
    tails = {r["question"][len(p["question"]) - 1:-1] for p, r in zip(a, b)}
    assert tails <= set(FILLERS) and len(tails) >= 5
    assert [(p["answer"], p["video_basename"]) for p in a] == [(r["answer"], r["video_basename"]) for r in b]
    assert [r["prompt"][-1]["content"][-1]["text"].count(r0["question"]) for r, r0 in
            zip(read(varied, "training_with_cot_6k.jsonl"), b)] == [1] * 40
    assert words() == words(False) and QUESTION.format(obj="cup") in words()
    assert set(words(True)) > set(words()) and any(w.endswith(" right here and now?") for w in words(True))


def test_reasoning_answer_consistency_by_hand(tmp_path):
    """Options are the steps in VERBS order (open, wash, fill, close), so "next: fill" implies C.
    Four rows: consistent and right; consistent and wrong (the count misread); right but the reasoning
    names another step; no letter. Answered 3 of 4, consistent 2 of 3. A second seed with every row
    consistent: answered 75.0 ± 0.0, consistent 83.3 ± 23.6 (66.7 and 100: sample std 33.3 / sqrt 2)."""
    from sbr.synth import consistency, consistency_table, consistent
    rows = [{"response": "<think>2 steps done, next: fill.</think><answer>C</answer>", "extracted": "C", "correct": True},
            {"response": "<think>1 steps done, next: wash.</think><answer>B</answer>", "extracted": "B", "correct": False},
            {"response": "<think>0 steps done, next: open.</think><answer>D</answer>", "extracted": "D", "correct": True},
            {"response": "<think>3 steps done, next: close.</think><answer>", "extracted": None, "correct": False}]
    assert [consistent(r["response"], r["extracted"]) for r in rows] == [True, True, False, False]
    assert not consistent("<think>I compare the options.</think><answer>A</answer>", "A")   # names no step
    assert not consistent("<think>0 steps done, next: open.<answer>A</answer>", "A")        # <think> not closed
    assert consistency(rows) == {"questions": 4, "answered": 3, "consistent": 2}
    seeds = []
    for s, third in enumerate(("D", "A")):
        d = tmp_path / f"seed{s}"
        d.mkdir()
        mine = [dict(r) for r in rows]
        mine[2].update(response=f"<think>0 steps done, next: open.</think><answer>{third}</answer>", extracted=third)
        for level in ("L1", "L2", "L3"):
            with open(d / f"predictions_{level}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in mine)
        seeds.append(str(d))
    table = consistency_table({"M": seeds})
    assert "| M (2 seeds) | 75.0 ± 0.0 | 83.3 ± 23.6 | 75.0 ± 0.0 | 83.3 ± 23.6 |" in table, table


def test_l3_split_by_the_objects_token_count(tmp_path):
    """With the synthetic benchmark's tokenizer every training object takes 2 tokens (" cup" = " cu" "p")
    and L3's take 2 (" kit", " tent", " drawer") or 3 (" bowl", " mug", " case", " cooler", " crate").
    A run right on exactly the 2-token questions reads 100.0 and 0.0; a second seed right on all of
    them 100.0 ± 0.0 and 50.0 ± 70.7 (0 and 100: sample std 100 / sqrt 2)."""
    from sbr.synth import l3_by_length, words
    from sbr.tiny import build_processor, build_tokenizer
    from transformers import AutoTokenizer
    data = build(str(tmp_path / "data"), train=8, val=16)
    model = str(tmp_path / "model")
    build_processor(build_tokenizer(words()), "qwen2_vl").save_pretrained(model)
    tok = AutoTokenizer.from_pretrained(model)
    assert {len(tok.tokenize(" " + o)) for o in TRAIN_OBJECTS} == {2}
    records = [json.loads(line) for line in open(os.path.join(data, "annotations", "validation_L3.jsonl"))]
    short = {r["sample_id"]: len(tok.tokenize(" " + r["question"].rsplit(" ", 1)[1].rstrip("?"))) == 2 for r in records}
    assert 0 < sum(short.values()) < len(short)
    seeds = []
    for s, right in enumerate((lambda i: short[i], lambda i: True)):
        d = tmp_path / f"eval{s}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"config": {"model": model, "data_root": data}}))
        (d / "predictions_L3.jsonl").write_text("".join(json.dumps({"sample_id": i, "correct": right(i)}) + "\n" for i in short))
        seeds.append(str(d))
    assert "| L3, objects of 2 tokens (as every training object) | L3, objects of 3 tokens |" in l3_by_length({"M": seeds[:1]})
    assert "| M (1 seed) | 100.0 | 0.0 |" in l3_by_length({"M": seeds[:1]})        # one seed: no ± 0.0
    assert "| M (2 seeds) | 100.0 ± 0.0 | 50.0 ± 70.7 |" in l3_by_length({"M": seeds})
