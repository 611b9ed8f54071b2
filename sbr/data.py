"""SEED-Bench-R1 and LongVideoBench annotations -> one small `Sample` record.

Layout (../shared/SEED-BENCH-R1.md, the Hugging Face dataset TencentARC/SEED-Bench-R1):
    <data_root>/annotations/{training_6k,validation_L1,validation_L2,validation_L3}.jsonl
    <data_root>/videos/<video_source>/<video_basename>                 progress clip (.mp4)
    <data_root>/images/<video_source>/<current_observation_basename>   current observation (.png)

Every problem in a file is a `DataError` naming the file, the line and the field; a `sample_id` seen
twice names both lines (predictions are keyed by it). A missing media file is an error too, or, with
`on_missing="skip"`, a skip that is counted and printed, never silent. `domain` is checked against
Table 2's four names only in L3 (required there); elsewhere it is kept as given.
"""
import codecs
import json
import os
import random
import re
from dataclasses import dataclass

from sbr.common import UserError

LETTERS = "ABCDE"
# LongVideoBench's duration groups (the upper bound in seconds -> Table 3's column) and levels
LVB_DURATION_GROUPS = {15: "(8,15]", 60: "(15,60]", 600: "(180,600]", 3600: "(900,3600]"}
LVB_LEVELS = {"L1-Perception": "perception", "L2-Relation": "relation"}
DOMAINS = {"dailylife": "Daily life", "hobbies": "Hobbies", "hobby": "Hobbies",
           "recreation": "Recreation", "work": "Work"}


class DataError(UserError, ValueError):
    """`file:line: field 'name': what is wrong`. DataError(text) alone also works (a DataLoader worker's
    error is rebuilt from its text in the main process)."""
    def __init__(self, path: str, line: int | None = None, field: str | None = None, message: str | None = None):
        self.path, self.line, self.field = path, line, field
        if line is None:
            super().__init__(path)
            return
        where = f"{path}:{line}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


@dataclass
class Sample:
    sample_id: int | str               # as given in the file; keys resumable predictions
    question: str
    options: list[str]                 # 4 texts for SEED-Bench-R1 (4 or 5 for LongVideoBench)
    answer: str                        # the gold letter
    video: str | None = None           # progress clip; None when the progress is empty
    image: str | None = None           # current observation
    level: str | None = None           # "L1" / "L2" / "L3" (SEED-Bench-R1), "L1-Perception" / "L2-Relation" (LongVideoBench)
    domain: str | None = None          # L3 domain, normalised
    duration_group: int | None = None  # LongVideoBench only
    question_category: str | None = None
    source: tuple = ()                 # (annotation file, line, video field, image field): where errors point


@dataclass
class ChatSample:
    """One SFT record: a ready chat prompt (media paths made absolute) and the assistant's response."""
    sample_id: int | str
    messages: list[dict]
    response: str
    video: str | None = None
    image: str | None = None
    source: tuple = ()                 # (annotation file, line, video field, image field)


class Samples(list):
    """A list of samples that also remembers what was skipped: `skipped` holds (line, missing path)."""
    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped = list(skipped)


def _read_bytes(path: str) -> bytes:
    """A file's bytes without a UTF-8 byte-order mark."""
    with open(path, "rb") as f:
        raw = f.read()
    return raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw


def read_jsonl(path: str):
    """Yield (line number, record) for each non-blank line. A UTF-8 byte-order mark is accepted; a line
    that is not UTF-8 or not a JSON object is an error naming the line; so is a file with no records."""
    raw, found = _read_bytes(path), False
    for line_no, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, line_no, None, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, line_no, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(path, line_no, None, f"expected a JSON object, got {type(record).__name__}")
        found = True
        yield line_no, record
    if not found:
        raise DataError(path, 1, None, "no records: the file is empty or blank")


def read_json(path: str):
    """One JSON document (LongVideoBench's list), BOM accepted, errors naming the line."""
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, raw[:e.start].count(b"\n") + 1, None, f"not UTF-8 (byte 0x{raw[e.start]:02x})") from None
    if not text.strip():
        raise DataError(path, 1, None, "no records: the file is empty or blank")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"not valid JSON ({e.msg})") from None


def _get(record: dict, field: str, path: str, line: int, kind=str):
    if field not in record or record[field] is None:
        raise DataError(path, line, field, "missing")
    value = record[field]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise DataError(path, line, field, f"expected a non-empty {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _level(annotation_file: str) -> str | None:
    match = re.search(r"validation_(L[123])", os.path.basename(annotation_file))
    return match.group(1) if match else None


def _options(record: dict, path: str, line: int, rng: random.Random) -> tuple[list[str], str]:
    """Validation: choice_a..choice_d with golden_choice_idx. Training: answer + 3 seeded negatives."""
    if "choice_a" in record or "golden_choice_idx" in record:
        options = [_get(record, f"choice_{c}", path, line) for c in "abcd"]
        gold = _get(record, "golden_choice_idx", path, line)
        if gold.strip().upper() not in "ABCD" or len(gold.strip()) != 1:
            raise DataError(path, line, "golden_choice_idx", f"expected a letter A..D, got {gold!r}")
        return options, gold.strip().upper()
    answer = _get(record, "answer", path, line)
    negatives = _get(record, "negative_answers", path, line, list)
    if len(negatives) < 3 or not all(isinstance(n, str) for n in negatives):
        raise DataError(path, line, "negative_answers", f"expected at least 3 strings, got {negatives!r}")
    options = rng.sample(negatives, 3) + [answer]
    rng.shuffle(options)
    return options, "ABCD"[options.index(answer)]


def _unique(sample_id, seen: dict, where: tuple, field: str) -> None:
    """A repeated id would let one question's prediction replace another's: an error naming both lines."""
    key = (type(sample_id).__name__, sample_id)            # 1 and "1" are different ids
    if key in seen:
        raise DataError(*where, field, f"{sample_id!r} repeats the id of line {seen[key]}")
    seen[key] = where[1]


def _media(path: str, where: tuple, on_missing: str, skipped: list) -> bool:
    if os.path.exists(path):
        return True
    if on_missing == "skip":
        skipped.append((where[1], path))
        return False
    raise DataError(*where, f"media file not found: {path} (--on_missing skip skips and counts such questions)")


def load_seedbench(annotation_file: str, data_root: str, *, seed: int = 0,
                   on_missing: str = "error") -> Samples:
    """Read one SEED-Bench-R1 annotation file. Training options are shuffled with
    `random.Random(f"{seed}:{line}")`, so a record's options do not depend on the records before it."""
    level, out, skipped, seen = _level(annotation_file), [], [], {}
    for line, record in read_jsonl(annotation_file):
        where = (annotation_file, line)
        sample_id = record.get("sample_id")
        if sample_id is None or isinstance(sample_id, (bool, float, list, dict)):
            raise DataError(*where, "sample_id", f"expected an int or a string, got {sample_id!r}")
        _unique(sample_id, seen, where, "sample_id")
        question = _get(record, "question", *where)
        options, gold = _options(record, *where, random.Random(f"{seed}:{line}"))
        source = _get(record, "video_source", *where)
        progress = record.get("task_progress_metadata")
        if progress is not None and not isinstance(progress, list):
            raise DataError(*where, "task_progress_metadata", f"expected a list, got {type(progress).__name__}")
        has_video = bool(progress) if progress is not None else bool(record.get("video_basename"))
        video = None
        if has_video:
            video = os.path.join(data_root, "videos", source, _get(record, "video_basename", *where))
        image = os.path.join(data_root, "images", source, _get(record, "current_observation_basename", *where))
        domain = record.get("domain")
        if level == "L3":                  # Table 2's columns: one of the four, spelled any way
            key = re.sub(r"[^a-z]", "", str(_get(record, "domain", *where)).lower())
            if key not in DOMAINS:
                raise DataError(*where, "domain", f"unknown domain {domain!r}; expected one of {sorted(set(DOMAINS.values()))}")
            domain = DOMAINS[key]
        media_ok = all(_media(p, (*where, f), on_missing, skipped)
                       for p, f in ((video, "video_basename"), (image, "current_observation_basename")) if p)
        if media_ok:
            out.append(Sample(sample_id, question, options, gold, video, image, level, domain,
                              source=(annotation_file, line, "video_basename", "current_observation_basename")))
    return Samples(out, skipped)


def load_longvideobench(annotation_file: str, data_root: str, *, on_missing: str = "error") -> Samples:
    """LongVideoBench `lvb_val.json` (a JSON list of records with `id`, `video_path`, `question`,
    `candidates`, `correct_choice`, `duration_group`, `question_category`, `level`, and `video_id`,
    `duration`, `subtitle_path`, ... which sbr does not need). Videos are looked up under
    <data_root>/videos/, then <data_root>/. Video and text only, as the authors evaluated it.
    `level` ("L1-Perception" / "L2-Relation") gives Table 3's perception and relation columns."""
    records = read_json(annotation_file)
    if not isinstance(records, list) or not records:
        raise DataError(annotation_file, 1, None, "expected a non-empty JSON list of records")
    out, skipped, seen = [], [], {}
    for index, record in enumerate(records):
        where = (annotation_file, index + 1)   # LongVideoBench is one JSON list: the record number
        if not isinstance(record, dict):
            raise DataError(*where, None, "expected a JSON object")
        sample_id = _get(record, "id", *where, (int, str))
        _unique(sample_id, seen, where, "id")
        candidates = _get(record, "candidates", *where, list)
        if not 2 <= len(candidates) <= len(LETTERS):
            raise DataError(*where, "candidates", f"expected 2..{len(LETTERS)} options, got {len(candidates)}")
        correct = record.get("correct_choice")
        if not isinstance(correct, int) or isinstance(correct, bool) or not 0 <= correct < len(candidates):
            raise DataError(*where, "correct_choice", f"expected an index into candidates, got {correct!r}")
        group = record.get("duration_group")
        if group not in LVB_DURATION_GROUPS or isinstance(group, bool):
            raise DataError(*where, "duration_group", f"expected one of {tuple(LVB_DURATION_GROUPS)}, got {group!r}")
        level = _get(record, "level", *where)
        if level not in LVB_LEVELS:
            raise DataError(*where, "level", f"expected one of {tuple(LVB_LEVELS)}, got {level!r}")
        category = _get(record, "question_category", *where)
        rel = _get(record, "video_path", *where)
        video = next((p for p in (os.path.join(data_root, "videos", rel), os.path.join(data_root, rel))
                      if os.path.exists(p)), os.path.join(data_root, "videos", rel))
        if not _media(video, (*where, "video_path"), on_missing, skipped):
            continue
        out.append(Sample(sample_id=sample_id, question=_get(record, "question", *where),
                          options=[str(c) for c in candidates], answer=LETTERS[correct], video=video,
                          level=level, duration_group=group, question_category=category,
                          source=(annotation_file, index + 1, "video_path", None)))
    return Samples(out, skipped)


def load_sft(annotation_file: str, data_root: str, *, on_missing: str = "error") -> Samples:
    """SEED-Bench-R1's `training_with_cot_6k.jsonl`: a ready chat `prompt` whose media entries
    (`{"type": "video", "video": path}`, `{"type": "image", "image": path}`) are relative to data_root,
    and a `response` (the chain of thought with <think>/<answer> tags). At most one video and one
    image a prompt. `sample_id` as given, else the line number."""
    out, skipped = [], []
    for line, record in read_jsonl(annotation_file):
        where = (annotation_file, line)
        prompt = _get(record, "prompt", *where, list)
        response = _get(record, "response", *where)
        messages, media = [], {"video": [], "image": []}
        for m, message in enumerate(prompt):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(*where, f"prompt[{m}]", "expected a message with 'role' and 'content'")
            content = message["content"]
            if isinstance(content, list):
                content = [dict(c) for c in content]
                for c, entry in enumerate(content):
                    kind = entry.get("type") if isinstance(entry, dict) else None
                    if kind in media:
                        rel = entry.get(kind) or entry.get("path")
                        if not isinstance(rel, str) or not rel:
                            raise DataError(*where, f"prompt[{m}].content[{c}]", f"a {kind} entry without a path")
                        entry[kind] = rel if os.path.isabs(rel) else os.path.join(data_root, rel)
                        media[kind].append((entry[kind], f"prompt[{m}].content[{c}]"))
                    elif kind != "text":
                        raise DataError(*where, f"prompt[{m}].content[{c}]", f"unknown content type {kind!r}")
            messages.append({**message, "content": content})
        for kind, found in media.items():
            if len(found) > 1:
                raise DataError(*where, found[1][1], f"more than one {kind} in a prompt")
        if all(_media(path, (*where, field), on_missing, skipped) for found in media.values() for path, field in found):
            out.append(ChatSample(record.get("sample_id", line), messages, response,
                                  video=media["video"][0][0] if media["video"] else None,
                                  image=media["image"][0][0] if media["image"] else None,
                                  source=(annotation_file, line, *(m[0][1] if m else None for m in media.values()))))
    return Samples(out, skipped)


# What the first bytes of a media file must be, by extension (other extensions: existence and size only).
MAGIC = {(".mp4", ".mov", ".m4v"): (4, b"ftyp"), (".png",): (0, b"\x89PNG\r\n\x1a\n"),
         (".jpg", ".jpeg"): (0, b"\xff\xd8\xff"), (".webm", ".mkv"): (0, b"\x1a\x45\xdf\xa3")}


def media_problems(samples) -> dict[int, str]:
    """A fast check of every media file before training (no decoding): it exists, is not empty, and
    starts the way its extension says. {index into samples: "file:line: field 'x': what is wrong"}."""
    problems = {}
    for i, sample in enumerate(samples):
        file, line, video_field, image_field = sample.source or ("?", 0, "video", "image")
        for path, field in ((sample.video, video_field), (sample.image, image_field)):
            if path is None:
                continue
            if not os.path.isfile(path):
                wrong = "not found"
            elif os.path.getsize(path) == 0:
                wrong = "empty"
            else:
                wrong = None
                for extensions, (offset, magic) in MAGIC.items():
                    if path.lower().endswith(extensions):
                        with open(path, "rb") as f:
                            head = f.read(offset + len(magic))
                        if head[offset:] != magic:
                            wrong = f"does not start as a {extensions[0]} file does ({head[:12]!r})"
            if wrong:
                problems[i] = str(DataError(file, line, field, f"{path}: {wrong}"))
                break
    return problems
