import json
import os

import pytest

from sbr.data import DataError, load_longvideobench, load_seedbench

VALID = {"sample_id": 7, "question": "What next to make tea?", "choice_a": "boil water", "choice_b": "take cup",
         "choice_c": "pour water", "choice_d": "add milk", "golden_choice_idx": "C", "video_source": "EpicKitchens",
         "video_basename": "clip.mp4", "current_observation_basename": "obs.png",
         "task_progress_metadata": [{"narration_text": "boil water", "start_frame": 0, "stop_frame": 9}]}


def write(tmp_path, records, name="validation_L1.jsonl", raw=None):
    """A data root with the given annotation lines and the media files they name."""
    (tmp_path / "annotations").mkdir(exist_ok=True)
    for sub in ("videos/EpicKitchens", "images/EpicKitchens", "videos/Ego4D", "images/Ego4D"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        for f in ("clip.mp4", "obs.png"):
            (tmp_path / sub / f).write_bytes(b"x")
    path = tmp_path / "annotations" / name
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records))
    return str(path), str(tmp_path)


def test_tiny_validation_files_load_with_levels_domains_and_ids(tiny):
    root = os.path.join(tiny, "data")
    l1 = load_seedbench(os.path.join(root, "annotations", "validation_L1.jsonl"), root)
    l3 = load_seedbench(os.path.join(root, "annotations", "validation_L3.jsonl"), root)
    assert len(l1) == 8 and len(l3) == 8
    assert {s.level for s in l1} == {"L1"} and {s.level for s in l3} == {"L3"}
    assert all(isinstance(s.sample_id, int) for s in l1) and all(isinstance(s.sample_id, str) for s in l3)
    assert sorted({s.domain for s in l3}) == ["Daily life", "Hobbies", "Recreation", "Work"]
    # no progress -> no video; with progress -> the clip under videos/<source>/
    assert any(s.video is None for s in l1) and any(s.video is not None for s in l1)
    for s in l1:
        assert os.path.exists(s.image) and (s.video is None or os.path.exists(s.video))
        assert len(s.options) == 4 and s.answer in "ABCD"


def test_validation_options_keep_file_order(tmp_path):
    path, root = write(tmp_path, [VALID])
    [s] = load_seedbench(path, root)
    assert s.options == ["boil water", "take cup", "pour water", "add milk"] and s.answer == "C"
    assert s.sample_id == 7 and s.video.endswith(os.path.join("videos", "EpicKitchens", "clip.mp4"))


def test_training_options_are_three_negatives_and_the_answer_shuffled_by_seed(tmp_path):
    record = {k: v for k, v in VALID.items() if not k.startswith(("choice", "golden"))}
    records = [dict(record, sample_id=i, answer=f"right {i}", negative_answers=[f"wrong {i}.{j}" for j in range(5)])
               for i in range(20)]
    path, root = write(tmp_path, records, name="training_6k.jsonl")
    a, b, c = load_seedbench(path, root, seed=0), load_seedbench(path, root, seed=0), load_seedbench(path, root, seed=1)
    assert [s.options for s in a] == [s.options for s in b]                    # seeded: reproducible
    assert [s.options for s in a] != [s.options for s in c]                    # the seed matters
    for i, s in enumerate(a):
        assert s.level is None and len(s.options) == 4 and len(set(s.options)) == 4
        assert s.options["ABCD".index(s.answer)] == f"right {i}"
        assert all(o.startswith(f"wrong {i}.") for o in s.options if o != f"right {i}")
    assert len({s.answer for s in a}) > 1                                      # the answer moves


def test_empty_progress_means_no_video(tmp_path):
    path, root = write(tmp_path, [dict(VALID, task_progress_metadata=[])])
    [s] = load_seedbench(path, root)
    assert s.video is None and s.image.endswith("obs.png")


@pytest.mark.parametrize("line, field, words", [
    ('{"sample_id": 1, "question": ', None, "not valid JSON"),
    (json.dumps({k: v for k, v in VALID.items() if k != "question"}), "question", "missing"),
    (json.dumps(dict(VALID, golden_choice_idx="E")), "golden_choice_idx", "A..D"),
    (json.dumps(dict(VALID, golden_choice_idx="")), "golden_choice_idx", ""),
    (json.dumps({k: v for k, v in VALID.items() if k != "choice_c"}), "choice_c", "missing"),
    (json.dumps(dict(VALID, task_progress_metadata="x")), "task_progress_metadata", "list"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, field, words):
    path, root = write(tmp_path, None, raw=json.dumps(dict(VALID, sample_id=1)) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_seedbench(path, root)
    assert err.value.path == path and err.value.line == 3 and err.value.field == field
    assert f"{path}:3" in str(err.value) and words in str(err.value)


def test_missing_media_is_an_error_or_a_counted_skip(tmp_path):
    path, root = write(tmp_path, [VALID, dict(VALID, sample_id=8, current_observation_basename="gone.png")])
    with pytest.raises(DataError, match="gone.png") as err:
        load_seedbench(path, root)
    assert err.value.line == 2 and err.value.field == "current_observation_basename"
    samples = load_seedbench(path, root, on_missing="skip")
    assert [s.sample_id for s in samples] == [7]
    assert samples.skipped == [(2, os.path.join(root, "images", "EpicKitchens", "gone.png"))]


def test_domain_spellings_are_normalised(tmp_path):
    records = [dict(VALID, sample_id=i, domain=d) for i, d in enumerate(["daily life", "Daily_Life", "HOBBIES", "work"])]
    path, root = write(tmp_path, records, name="validation_L3.jsonl")
    assert [s.domain for s in load_seedbench(path, root)] == ["Daily life", "Daily life", "Hobbies", "Work"]


def test_longvideobench_records(tiny, tmp_path):
    root = os.path.join(tiny, "longvideobench")
    samples = load_longvideobench(os.path.join(root, "lvb_val.json"), root)
    assert len(samples) == 8 and {len(s.options) for s in samples} == {4, 5}
    assert {s.duration_group for s in samples} == {15, 60, 600, 3600}
    assert all(s.image is None and os.path.exists(s.video) and s.answer in "ABCDE" for s in samples)
    records = json.load(open(os.path.join(root, "lvb_val.json")))
    records[3]["correct_choice"] = 9
    bad = tmp_path / "lvb_val.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(DataError, match="correct_choice") as err:
        load_longvideobench(str(bad), root)
    assert err.value.line == 4


def test_domain_is_checked_in_L3_only_and_required_there(tmp_path):
    path, root = write(tmp_path, [dict(VALID, domain="Sports")])                 # validation_L1: kept as given
    assert load_seedbench(path, root)[0].domain == "Sports"
    path, root = write(tmp_path, [dict(VALID, domain="Sports")], name="training_6k.jsonl")
    assert load_seedbench(path, root)[0].domain == "Sports"
    for record, words in ((dict(VALID, domain="Sports"), "unknown domain"), (VALID, "missing")):
        path, root = write(tmp_path, [record], name="validation_L3.jsonl")
        with pytest.raises(DataError, match=words) as err:
            load_seedbench(path, root)
        assert err.value.field == "domain" and err.value.line == 1


def test_a_repeated_sample_id_names_both_lines(tmp_path):
    """Line 3 repeats line 1's id: an error naming the file, line 3 and line 1 (predictions are keyed
    by sample_id, so one question would silently replace the other). 7 and "7" are different ids."""
    records = [VALID, dict(VALID, sample_id="7"), VALID]
    path, root = write(tmp_path, records)
    with pytest.raises(DataError, match="line 1") as err:
        load_seedbench(path, root)
    assert f"{path}:3" in str(err.value) and err.value.field == "sample_id"
    assert [s.sample_id for s in load_seedbench(*write(tmp_path, records[:2]))] == [7, "7"]


def test_longvideobench_repeated_id_and_table3_fields(tiny, tmp_path):
    root = os.path.join(tiny, "longvideobench")
    records = json.load(open(os.path.join(root, "lvb_val.json")))
    samples = load_longvideobench(os.path.join(root, "lvb_val.json"), root)
    assert [s.level for s in samples] == [r["level"] for r in records]
    assert [s.question_category for s in samples] == [r["question_category"] for r in records]
    bad = tmp_path / "lvb_val.json"
    for change, field, words in ((lambda rs: rs[5].update(id=rs[1]["id"]), "id", "record 2"),
                                 (lambda rs: rs[2].pop("level"), "level", "missing"),
                                 (lambda rs: rs[2].update(level="L3-Reasoning"), "level", "L1-Perception"),
                                 (lambda rs: rs[2].update(duration_group=120), "duration_group", "3600")):
        copy = json.loads(json.dumps(records))
        change(copy)
        bad.write_text(json.dumps(copy))
        with pytest.raises(DataError, match=words.replace("record 2", "line 2")) as err:
            load_longvideobench(str(bad), root)
        assert err.value.field == field


def test_annotation_encodings_empty_files_and_bom(tmp_path):
    """An empty or blank-only file is an error naming it (evaluating it would print a table of
    nothing); a non-UTF-8 byte is an error naming the line; a UTF-8 byte-order mark is accepted."""
    from sbr.data import load_sft
    for raw in (b"", b"\n  \n\n"):
        path, root = write(tmp_path, None, raw="")
        open(path, "wb").write(raw)
        for load in (load_seedbench, load_sft):
            with pytest.raises(DataError, match="no records") as err:
                load(path, root)
            assert err.value.path == path
    path, root = write(tmp_path, None, raw="")
    open(path, "wb").write(json.dumps(VALID).encode() + b"\n" + json.dumps(dict(VALID, sample_id=8, question="caf\xe9"), ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match="not UTF-8") as err:
        load_seedbench(path, root)
    assert f"{path}:2" in str(err.value)
    open(path, "wb").write(b"\xef\xbb\xbf" + json.dumps(VALID).encode() + b"\n")
    assert [s.sample_id for s in load_seedbench(path, root)] == [7]


def test_longvideobench_file_encodings(tiny, tmp_path):
    root = os.path.join(tiny, "longvideobench")
    raw = open(os.path.join(root, "lvb_val.json"), "rb").read()
    bad = tmp_path / "lvb_val.json"
    bad.write_bytes(b"\xef\xbb\xbf" + raw)
    assert len(load_longvideobench(str(bad), root)) == 8
    for content, words in ((b"", "no records"), (b"[]", "non-empty"), (raw.replace(b"What", b"Wh\xe0t", 1), "not UTF-8")):
        bad.write_bytes(content)
        with pytest.raises(DataError, match=words):
            load_longvideobench(str(bad), root)
