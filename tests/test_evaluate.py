import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

import evaluate
from sbr.results import longvideobench_table, markdown, seedbench_table


def config(tiny, out_dir, **kw):
    return evaluate.Config(model=os.path.join(tiny, "qwen2_vl"), data_root=os.path.join(tiny, "data"),
                           out_dir=str(out_dir), max_new_tokens=4, batch_size=3, num_workers=0, **kw)


class FakeGenerate:
    """Stands in for decoding: answers right when `rule(sample)` holds, and counts what it decodes."""
    def __init__(self, rule, crash_after=None):
        self.rule, self.crash_after, self.seen = rule, crash_after, []

    def __call__(self, model, batch, tokenizer, cfg, device, dtype):
        if self.crash_after is not None and len(self.seen) >= self.crash_after:
            raise RuntimeError("simulated crash")
        out = []
        for s in batch["samples"]:
            self.seen.append(s.sample_id)
            wrong = "ABCDE"[("ABCDE".index(s.answer) + 1) % len(s.options)]
            out.append(f"<think>...</think><answer>{s.answer if self.rule(s) else wrong}. x</answer>"
                       if s.sample_id != 0 else "I cannot tell.")     # sample 0: no parsable answer
        return out


def test_tiny_default_end_to_end_with_real_decoding(tiny, tmp_path):
    results = evaluate.main(config(tiny, tmp_path))
    table = results["table"]
    assert list(table) == ["L1", "L2", "L3 Daily life", "L3 Hobbies", "L3 Recreation", "L3 Work", "L3 overall"]
    assert [table[c]["questions"] for c in table] == [8, 6, 2, 2, 2, 2, 8]
    for split, n in [("L1", 8), ("L2", 6), ("L3", 8)]:
        rows = [json.loads(line) for line in open(tmp_path / f"predictions_{split}.jsonl")]
        assert len(rows) == n and {"sample_id", "response", "extracted", "correct"} <= set(rows[0])
    md = open(tmp_path / "results.md").read()
    assert "| model | L1 | L2 | L3 Daily life" in md and "| questions | 8 | 6 | 2 | 2 | 2 | 2 | 8 |" in md
    assert json.load(open(tmp_path / "results.json"))["table"] == table


def test_table_counts_right_answers_per_level_and_domain(tiny, tmp_path, monkeypatch):
    # right on even sample ids (L1, L2) and on the Daily life and Work questions of L3
    fake = FakeGenerate(lambda s: s.domain in ("Daily life", "Work") if s.level == "L3" else s.sample_id % 2 == 0)
    monkeypatch.setattr(evaluate, "generate", fake)
    table = evaluate.main(config(tiny, tmp_path))["table"]
    # L1 ids 0..7: 0, 2, 4, 6 are even, but 0 answers nothing parsable -> 3 / 8
    assert table["L1"]["accuracy"] == pytest.approx(37.5) and table["L1"]["no_answer"] == 1
    # L2 ids 0..5: 2, 4 right (0 unparsable) -> 2 / 6
    assert table["L2"]["accuracy"] == pytest.approx(100 * 2 / 6)
    assert [table[f"L3 {d}"]["accuracy"] for d in ("Daily life", "Hobbies", "Recreation", "Work")] == [100, 0, 0, 100]
    assert table["L3 overall"]["accuracy"] == 50 and table["L3 overall"]["no_answer"] == 0


def test_a_crash_loses_nothing_and_a_rerun_recomputes_nothing_done(tiny, tmp_path, monkeypatch):
    crash = FakeGenerate(lambda s: True, crash_after=3)          # dies on the second batch of L1
    monkeypatch.setattr(evaluate, "generate", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate.main(config(tiny, tmp_path))
    first = crash.seen
    assert first == [0, 1, 2]
    written = [json.loads(line)["sample_id"] for line in open(tmp_path / "predictions" / "L1.rank0.jsonl")]
    assert written == first                                       # the finished batch is on disk

    resume = FakeGenerate(lambda s: True)
    monkeypatch.setattr(evaluate, "generate", resume)
    table = evaluate.main(config(tiny, tmp_path))["table"]
    assert sorted(resume.seen[:5]) == [3, 4, 5, 6, 7] and len(resume.seen) == 5 + 6 + 8
    assert table["L1"]["questions"] == 8 and table["L1"]["correct"] == 7   # sample 0 has no answer

    again = FakeGenerate(lambda s: True)
    monkeypatch.setattr(evaluate, "generate", again)
    assert evaluate.main(config(tiny, tmp_path))["table"] == table and again.seen == []


def test_a_torn_last_line_is_recomputed(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "generate", FakeGenerate(lambda s: True))
    evaluate.main(config(tiny, tmp_path, levels=["L2"]))
    path = tmp_path / "predictions" / "L2.rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])         # the last row cut mid-write
    redo = FakeGenerate(lambda s: True)
    monkeypatch.setattr(evaluate, "generate", redo)
    results = evaluate.main(config(tiny, tmp_path, levels=["L2"]))
    assert redo.seen == [json.loads(lines[-1])["sample_id"]] and results["torn_lines_recomputed"] == 1
    assert results["table"]["L2"]["questions"] == 6


def test_longvideobench_table3_as_published(tiny, tmp_path, monkeypatch):
    """Columns: the four duration groups, perception and relation (from `level`), overall; the raw
    question categories in a second table. The tiny file: record i has group [15, 60, 600, 3600][i % 4]
    and (category, level) S2E/L1, S2E/L1, T3O/L2, T3O/L2, E2O/L1, E2O/L1, SSS/L2, SSS/L2. Right when
    the group is 15 or the level relation: records 0, 2, 3, 4, 6, 7 ->
    (8,15] 2/2, (15,60] 0/2, (180,600] 2/2, (900,3600] 2/2, perception 2/4, relation 4/4, overall 6/8."""
    monkeypatch.setattr(evaluate, "generate", FakeGenerate(lambda s: s.duration_group == 15 or s.level == "L2-Relation"))
    cfg = evaluate.Config(model=os.path.join(tiny, "qwen2_vl"), data_root=os.path.join(tiny, "longvideobench"),
                          benchmark="longvideobench", out_dir=str(tmp_path), num_workers=0)
    results = evaluate.main(cfg)
    table = results["table"]
    assert list(table) == ["(8,15]", "(15,60]", "(180,600]", "(900,3600]", "perception", "relation", "overall"]
    assert [table[c]["accuracy"] for c in table] == [100, 0, 100, 100, 50, 100, 75]
    assert [table[c]["questions"] for c in table] == [2, 2, 2, 2, 4, 4, 8]
    categories = results["categories"]
    assert {c: categories[c]["accuracy"] for c in categories} == {"E2O": 50, "S2E": 50, "SSS": 100, "T3O": 100,
                                                                   "overall": 75}
    md = open(tmp_path / "results.md").read()
    assert "| model | (8,15] | (15,60] | (180,600] | (900,3600] | perception | relation | overall |" in md
    assert "by question category" in md


def test_tiny_longvideobench_carries_the_real_record_fields(tiny):
    records = json.load(open(os.path.join(tiny, "longvideobench", "lvb_val.json")))
    real = {"video_id", "question", "question_wo_referring_query", "candidates", "correct_choice", "position",
            "topic_category", "question_category", "level", "id", "video_path", "subtitle_path", "duration_group",
            "starting_timestamp_for_subtitles", "duration", "view_count"}
    lower = {15: 8, 60: 15, 600: 180, 3600: 900}
    for r in records:
        assert set(r) == real
        assert lower[r["duration_group"]] < r["duration"] <= r["duration_group"]
        assert r["level"] in ("L1-Perception", "L2-Relation")


def test_tables_from_rows_and_markdown():
    row = lambda level, domain, ok, ext="A": {"level": level, "domain": domain, "correct": ok, "extracted": ext}
    table = seedbench_table({"L1": [row("L1", None, True), row("L1", None, False, None)],
                             "L3": [row("L3", "Work", True), row("L3", "Work", False), row("L3", "Hobbies", True)]})
    # Wilson, 1 of 2: centre 0.5, half (1.96 / 2.9207) sqrt(0.125 + 3.8415 / 16) = 0.4055
    assert [round(x, 2) for x in table["L1"].pop("ci95")] == [9.45, 90.55]
    assert table["L1"] == {"accuracy": 50.0, "correct": 1, "questions": 2, "no_answer": 1}
    assert table["L2"]["accuracy"] is None and table["L3 Work"]["accuracy"] == 50.0
    assert table["L3 overall"]["accuracy"] == pytest.approx(200 / 3)
    md = markdown(table, "m").splitlines()
    assert md[2] == "| m | 50.00 | - | - | 100.00 | - | 50.00 | 66.67 |"
    assert md[5] == "| no parsable answer | 1 | 0 | 0 | 0 | 0 | 0 | 0 |"
    lvb = longvideobench_table([{"duration_group": 3600, "level": "L2-Relation", "correct": True, "extracted": "A"},
                                {"duration_group": 15, "level": "L2-Relation", "correct": False, "extracted": "B"}])
    assert list(lvb) == ["(8,15]", "(15,60]", "(180,600]", "(900,3600]", "perception", "relation", "overall"]
    assert lvb["(15,60]"]["accuracy"] is None and lvb["perception"]["questions"] == 0
    assert lvb["relation"]["accuracy"] == 50 and lvb["(900,3600]"]["accuracy"] == 100


@pytest.mark.slow
def test_torchrun_two_ranks_shard_and_merge(tiny, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "evaluate.py", "--model", os.path.join(tiny, "qwen2_vl"), "--data_root", os.path.join(tiny, "data"),
           "--out_dir", str(tmp_path), "--max_new_tokens", "4", "--batch_size", "2", "--num_workers", "1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| questions | 8 | 6 | 2 | 2 | 2 | 2 | 8 |" in run.stdout
    ranks = [{json.loads(line)["sample_id"] for line in open(tmp_path / "predictions" / f"L1.rank{r}.jsonl")}
             for r in (0, 1)]
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1] and ranks[0] | ranks[1] == set(range(8))
    merged = [json.loads(line)["sample_id"] for line in open(tmp_path / "predictions_L1.jsonl")]
    assert merged == list(range(8))                               # merged back in file order


def test_a_rerun_never_mixes_two_models_or_settings(tiny, tmp_path, monkeypatch):
    """runs/grpo/export evaluated, then overwritten by a later training run and evaluated into the same
    folder: an error naming the weights file, nothing decoded, nothing mixed. So for any recorded
    setting; batch size (not an answer-changing setting) may change. --overwrite starts fresh."""
    import shutil
    from safetensors.torch import load_file, save_file
    from sbr.provenance import ProvenanceError
    export = tmp_path / "grpo" / "export"
    shutil.copytree(os.path.join(tiny, "qwen2_vl"), export)
    out = tmp_path / "eval"
    cfg = lambda **kw: replace(config(tiny, out, levels=["L2"]), model=str(export), **kw)
    first = FakeGenerate(lambda s: True)
    monkeypatch.setattr(evaluate, "generate", first)
    evaluate.main(cfg())
    assert len(first.seen) == 6 and json.load(open(out / "provenance.json"))["identity"]["dtype"] == "float32"

    weights = load_file(export / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1                             # a later run's export, same path
    save_file(weights, export / "model.safetensors", metadata={"format": "pt"})
    for kw, words in (({}, "model.safetensors"), ({"max_new_tokens": 8}, "max_new_tokens"),
                      ({"dtype": "bfloat16"}, "dtype"), ({"frame_size": 224}, "frame_size")):
        again = FakeGenerate(lambda s: True)
        monkeypatch.setattr(evaluate, "generate", again)
        with pytest.raises(ProvenanceError, match=words) as err:
            evaluate.main(cfg(**kw))
        assert "--overwrite true" in str(err.value) and again.seen == []
    fresh = FakeGenerate(lambda s: False)
    monkeypatch.setattr(evaluate, "generate", fresh)
    table = evaluate.main(cfg(overwrite=True))["table"]
    assert len(fresh.seen) == 6 and table["L2"]["correct"] == 0      # only the new model's answers
    resumed = FakeGenerate(lambda s: True)
    monkeypatch.setattr(evaluate, "generate", resumed)
    assert evaluate.main(cfg(batch_size=2))["table"] == table and resumed.seen == []


def test_a_failed_evaluation_leaves_nothing_that_blocks_its_rerun(tiny, tmp_path, monkeypatch):
    """A model whose weights do not load fails with a message naming it, writing no provenance.json; the
    corrected rerun into the same folder then runs. A record with no predictions under it is replaced."""
    import shutil
    from sbr.common import ConfigError
    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(tiny, "qwen2_vl"), bad)
    weights = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[:len(weights) // 2])       # a copy cut short
    out = tmp_path / "eval"
    monkeypatch.setattr(evaluate, "generate", FakeGenerate(lambda s: True))
    with pytest.raises(ConfigError, match=f"--model {bad}: its weights cannot be read"):
        evaluate.main(replace(config(tiny, out, levels=["L2"]), model=str(bad)))
    assert not (out / "provenance.json").exists()
    out.mkdir(exist_ok=True)
    (out / "provenance.json").write_text(json.dumps({"identity": {"model": {"sha256": "old"}}, "info": {}}))
    assert evaluate.main(config(tiny, out, levels=["L2"]))["table"]["L2"]["questions"] == 6
    assert json.load(open(out / "provenance.json"))["identity"]["model"] != {"sha256": "old"}


def test_predictions_without_a_record_are_refused(tiny, tmp_path, monkeypatch):
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "L1.rank0.jsonl").write_text(json.dumps({"sample_id": 0, "correct": True}) + "\n")
    monkeypatch.setattr(evaluate, "generate", FakeGenerate(lambda s: True))
    from sbr.provenance import ProvenanceError
    with pytest.raises(ProvenanceError, match="no provenance.json"):
        evaluate.main(config(tiny, tmp_path, levels=["L1"]))


def test_a_changed_annotation_file_is_caught(tiny, tmp_path, monkeypatch):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny, "data"), data)
    monkeypatch.setattr(evaluate, "generate", FakeGenerate(lambda s: True))
    cfg = replace(config(tiny, tmp_path / "eval", levels=["L2"]), data_root=str(data))
    evaluate.main(cfg)
    path = data / "annotations" / "validation_L2.jsonl"
    path.write_text(path.read_text().replace('"golden_choice_idx": "A"', '"golden_choice_idx": "B"'))
    from sbr.provenance import ProvenanceError
    with pytest.raises(ProvenanceError, match=r"data\[L2\]"):
        evaluate.main(cfg)
    evaluate.main(replace(cfg, levels=["L1"]))                  # another split of the same data is fine


def test_unreadable_media_is_skipped_and_counted_or_an_error(tiny, tmp_path, monkeypatch):
    import shutil
    from sbr.data import DataError, load_seedbench
    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny, "data"), data)
    l1 = load_seedbench(str(data / "annotations" / "validation_L1.jsonl"), str(data))
    victim = next(s for s in l1 if s.video)
    open(victim.video, "wb").write(b"garbage")
    monkeypatch.setattr(evaluate, "generate", FakeGenerate(lambda s: True))
    cfg = replace(config(tiny, tmp_path / "eval", levels=["L1"]), data_root=str(data))
    where = f"validation_L1.jsonl:{victim.source[1]}: field 'video_basename': {victim.video}: cannot read video"
    with pytest.raises(DataError, match="cannot read video") as err:
        evaluate.main(cfg)
    assert where in str(err.value)
    results = evaluate.main(replace(cfg, on_missing="skip"))
    assert results["table"]["L1"]["questions"] == 7
    [error] = results["skipped_unreadable_media"]["L1"]
    assert where in error
    assert "1 questions skipped" in open(tmp_path / "eval" / "results.md").read()
