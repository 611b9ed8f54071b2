"""What produced a folder of predictions, so that a rerun never mixes two runs' answers in one table.

`<out_dir>/provenance.json` holds an `identity` (everything that changes an answer: the model's
content hash, decoding, frames, dtype, the prompt, the annotation files, sbr's evaluation version) and
an `info` part (paths, batch size, ranks, versions: recorded, never compared). A rerun into the same
folder resumes only when its identity equals the recorded one; otherwise it is an error that names the
fields that differ and how to start fresh. Predictions with no record at all are an error too. The
record is checked before the model loads (a wrong rerun fails fast) and written only once the model
has loaded, just before the first prediction: a failed run leaves nothing that blocks its rerun.

Model identity: a local folder is hashed file by file (sha256; the files hashed in parallel threads:
Qwen2-VL-7B's 16.6 GB in bf16 takes ~3 s from the page cache at the 1.45 GB/s a core measured here, or
the disk's read time); a hub id is its snapshot's commit hash, which is a content address.
"""
import glob
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

from sbr.common import UserError


class ProvenanceError(UserError, RuntimeError):
    pass


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def model_identity(model: str) -> dict:
    """{"sha256": ..., "files": {name: sha256}} for a local folder; {"hub_id", "revision"} for a hub id."""
    if os.path.isdir(model):
        names = sorted(n for n in os.listdir(model) if os.path.isfile(os.path.join(model, n)))
        with ThreadPoolExecutor(max(1, min(8, len(names)))) as pool:
            files = dict(zip(names, pool.map(lambda n: file_sha256(os.path.join(model, n)), names)))
        return {"sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), "files": files}
    from transformers.utils import cached_file
    config = cached_file(model, "config.json")          # <cache>/models--org--name/snapshots/<commit>/config.json
    return {"hub_id": model, "revision": os.path.basename(os.path.dirname(config))}


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field), new.get(field)
        if field == "data":                               # splits run so far: compare the ones in both
            out += [f"data[{s}]: annotation file sha256 {a[s][:12]}… -> {b[s][:12]}…"
                    for s in sorted(set(a or {}) & set(b or {})) if a[s] != b[s]]
        elif field == "model" and a != b:
            changed = sorted(n for n in set((a or {}).get("files", {})) | set((b or {}).get("files", {}))
                             if (a or {}).get("files", {}).get(n) != (b or {}).get("files", {}).get(n))
            out.append("model: " + (f"files differ: {', '.join(changed)}" if changed else f"{_short(a)} -> {_short(b)}"))
        elif isinstance(a, dict) and isinstance(b, dict):
            out += [f"{field}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{field}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _short(identity) -> str:
    if not identity:
        return "none"
    return identity.get("sha256", "")[:12] + "…" if "sha256" in identity else f"{identity['hub_id']}@{identity['revision']}"


def outputs(out_dir: str) -> list[str]:
    """What an evaluation writes into out_dir (and --overwrite removes)."""
    return [os.path.join(out_dir, n) for n in ("predictions", "provenance.json", "results.json", "results.md",
                                                "attention", "attention.jsonl", "attention_examples")] + \
        glob.glob(os.path.join(out_dir, "predictions_*.jsonl"))


def check(out_dir: str, identity: dict, *, overwrite: bool = False) -> dict:
    """The identity this run will record in out_dir; writes nothing. Raises ProvenanceError when
    out_dir holds predictions made with other settings, or predictions with no record. A record with
    no predictions under it (a run that failed before answering: a model folder without weights, say)
    is stale, and is replaced."""
    path = os.path.join(out_dir, "provenance.json")
    predictions = [p for p in glob.glob(os.path.join(out_dir, "predictions", "*.jsonl")) if os.path.getsize(p)]
    if overwrite or not predictions:
        return identity
    if not os.path.exists(path):
        raise ProvenanceError(
            f"{out_dir} holds predictions ({len(predictions)} files) but no provenance.json saying what made them "
            "(an older sbr, or copied files), so they cannot be trusted to belong to this model and settings.\n"
            f"Start fresh with --overwrite true (deletes them), or write elsewhere with --out_dir.")
    with open(path, encoding="utf-8") as f:
        old = json.load(f)["identity"]
    diffs = _differences(old, identity)
    if diffs:
        raise ProvenanceError(
            f"{out_dir} holds predictions made with other settings, which this run would mix into its table:\n  "
            + "\n  ".join(diffs) + f"\nStart fresh with --overwrite true (deletes the predictions in {out_dir}), "
            "or write elsewhere with --out_dir.")
    return {**identity, "data": {**old.get("data", {}), **identity.get("data", {})}}


def write(out_dir: str, identity: dict, info: dict, *, overwrite: bool = False) -> dict:
    """Write provenance.json (atomically), once the run is about to write its first prediction (the model
    has loaded); with `overwrite`, the earlier outputs are deleted first. Returns the record."""
    if overwrite:
        for p in outputs(out_dir):
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "provenance.json")
    out = {"identity": identity, "info": info}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)
    return out
