"""Evaluate a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model on SEED-Bench-R1 (Table 2) or LongVideoBench (Table 3).

    python evaluate.py --model runs/grpo_tiny/export          # the tiny default's demonstration, CPU, seconds
    python evaluate.py --model Qwen/Qwen2-VL-7B-Instruct --data_root /data/SEED-Bench-R1
    torchrun --nproc_per_node 8 evaluate.py --model runs/grpo/export --data_root /data/SEED-Bench-R1
    torchrun --nproc_per_node 8 evaluate.py --model runs/grpo/export --benchmark longvideobench \
        --data_root /data/LongVideoBench
    python evaluate.py --compare runs/eval/sft runs/eval/grpo     # paired differences, no model loaded

Greedy decoding (sbr's own loop, sbr/rollout.py: the argmax at every step, visual tokens suppressed,
stopping at `<|im_end|>` or `<|endoftext|>`, 256 new tokens; nothing is taken from the checkpoint's
generation_config.json, whose repetition penalty or top-k would otherwise apply silently), batched
with left padding. Each rank takes every world_size-th question still to do and appends its
predictions to `<out_dir>/predictions/<split>.rank<r>.jsonl` as they are made; rerunning the same
command skips what is written, so a crash loses at most one batch. `<out_dir>/provenance.json`
records what made the predictions (model content hash, decoding, frames, dtype, prompt, annotation
files): a rerun with anything different is an error, never a silent mix (sbr/provenance.py).
Rank 0 merges them into `predictions_<split>.jsonl` and writes `results.json` and `results.md`, every
accuracy with its 95% Wilson interval. `--compare A B [C ...]` prints each run against the first on the
same questions: the paired difference per column with its 95% interval and an exact McNemar p-value
(sbr/stats.py).

Differences from the authors' evaluation: their dataset dispatch raised on the documented data path
and they printed no per-level/domain table; options keep the file's order (they shuffled them); a
lowercase answer letter counts.
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

from sbr import attention, cli, provenance, rollout
from sbr.attention import prompt_attention, query_mask, shares
from sbr.collate import SampleDataset, VideoCollator, drop_bad, model_inputs
from sbr.common import (DTYPES, ConfigError, check_flags, check_model_path, choose_attention,
                        init_distributed, print0, seed_everything)
from sbr.data import load_longvideobench, load_seedbench
from sbr.family import check_frame_size, resolve_frame_size
from sbr.model import STOP_TOKENS, load_processor, token_ids, visual_token_ids
from sbr.policy import Policy
from sbr.prompt import fingerprint
from sbr.results import (PredictionWriter, category_table, key, longvideobench_cells, longvideobench_table, markdown,
                         paired_comparison, prediction_files, read_predictions, seedbench_cells, seedbench_table,
                         training_summary)
from sbr.rewards import extract_answer
from sbr.sharded import load_on_device, prefetch
from sbr.tiny import fill_defaults

# Bump when a change to sbr alters what a model is shown or how its answer is read beyond what the
# recorded settings capture (frame decoding, pixels, positions, decoding, answer extraction): older
# predictions then no longer resume. 2: mRoPE positions as the original Qwen code (sbr/positions.py).
# 3: decoding with the prompt's K/V shared by the batch's rows (sbr/decode.py; the same tokens up to
# float rounding, which can still turn a near-tie).
EVAL_VERSION = 3


@dataclass
class Config:
    model: str = ""                  # Hugging Face folder or hub id; "" = the tiny default's (its warmed-up Qwen2-VL)
    data_root: str = ""              # SEED-Bench-R1 (or LongVideoBench) root; "" = the tiny default's (synthetic)
    benchmark: str = "seedbench"     # "seedbench" (Table 2) or "longvideobench" (Table 3)
    levels: list[str] = field(default_factory=lambda: ["L1", "L2", "L3"])  # SEED-Bench-R1 levels to run
    annotation: str = ""             # LongVideoBench annotation file; "" = <data_root>/lvb_val.json
    out_dir: str = ""                # "" = runs/eval/<model folder name>[_lvb]
    batch_size: int = 8              # questions decoded together per rank
    max_new_tokens: int = 256        # the paper's evaluation length
    stop_tokens: list[str] = field(default_factory=lambda: list(STOP_TOKENS))  # an answer ends at the first of these
    num_workers: int = 2             # DataLoader workers decoding video per rank
    frame_size: int = 0              # frames and image resized to this square; 0: the family's (252, the authors'; Qwen3-VL 256)
    max_frames: int = 16             # at most this many frames a clip, sampled at 2 fps
    dtype: str = "auto"              # auto = bfloat16 on GPU, float32 on CPU; or float32 / bfloat16
    timeout_minutes: float = 60          # how long a collective may wait (NCCL's default, 10, is less than a slow 7B export)
    on_missing: str = "error"        # a missing or unreadable video/image: "error", or "skip" (counted, reported)
    limit: int = 0                   # only the first N questions of each split (0 = all)
    tiny_dir: str = "runs/tiny"      # where the tiny default is built on first use
    trust_remote_code: bool = False  # allow a model folder's own Python code to run
    overwrite: bool = False          # delete the predictions already in out_dir (made with other settings) and start over
    compile_decode: bool = False     # torch.compile the decoding step (CUDA graphs on a GPU); speed only
    compare: list[str] = field(default_factory=list)  # evaluation folders: each vs the first, paired (loads no model)
    compare_common: bool = False     # --compare on the questions both runs answered (e.g. one made with --limit)
    attention: bool = False          # also measure where the reasoning looks (sbr/attention.py): attention.jsonl, a table
    attention_layers: list[int] = field(default_factory=list)   # layers averaged (empty = all)
    attention_tokens: str = "think"  # generated tokens measured: think (inside <think>...</think>) or all
    attention_examples: int = 0      # the first N questions of each split drawn as pictures (needs matplotlib)
    seed: int = 0


def check_config(cfg: Config) -> None:
    """Every flag checked before anything heavy loads; all the bad ones reported together."""
    if cfg.compare:
        missing = [d for d in cfg.compare if not os.path.exists(os.path.join(d, "results.json"))]
        if len(cfg.compare) < 2 or missing:
            raise ConfigError("--compare: expected two or more evaluation folders with a results.json"
                              + (f"; none in: {', '.join(missing)}" if missing else ""))
        return
    check_model_path(cfg.model)
    for flag, path in (("data_root", cfg.data_root), ("annotation", cfg.annotation)):
        if path and not os.path.exists(path):
            raise ConfigError(f"--{flag}: not found: {path}")
    check_flags(cfg, choices={"benchmark": ("seedbench", "longvideobench"), "levels": ("L1", "L2", "L3"),
                              "dtype": DTYPES, "on_missing": ("error", "skip"), "attention_tokens": ("think", "all")},
                at_least={"timeout_minutes": 1, "batch_size": 1, "max_new_tokens": 1, "num_workers": 0, "frame_size": 0, "max_frames": 2,
                          "limit": 0, "attention_examples": 0})
    try:
        check_frame_size(cfg)
    except ConfigError as e:
        if cfg.data_root:
            raise
        raise ConfigError(f"{e} (with no --data_root, evaluate.py runs the tiny demonstration's data at 56 px: give "
                          "--data_root for your data, or a --frame_size this model takes)") from None
    if cfg.attention_examples and not cfg.attention:
        raise ConfigError("--attention_examples: draws the attention of --attention true; add it")
    if cfg.attention_examples:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--attention_examples: needs matplotlib (pip install -e \".[plot]\")") from None
    if not cfg.levels or not cfg.stop_tokens:
        raise ConfigError("--levels and --stop_tokens: expected at least one each")


def split_files(cfg: Config) -> dict[str, str]:
    """{split name: annotation file}."""
    if cfg.benchmark == "longvideobench":
        return {"longvideobench": cfg.annotation or os.path.join(cfg.data_root, "lvb_val.json")}
    if cfg.benchmark == "seedbench":
        return {level: os.path.join(cfg.data_root, "annotations", f"validation_{level}.jsonl") for level in cfg.levels}
    raise ValueError(f"--benchmark must be seedbench or longvideobench, got {cfg.benchmark!r}")


def load_splits(cfg: Config) -> tuple[dict, dict]:
    """{split name: samples} and {split name: skipped (line, path) pairs}."""
    splits = {}
    for split, path in split_files(cfg).items():
        if cfg.benchmark == "longvideobench":
            splits[split] = load_longvideobench(path, cfg.data_root, on_missing=cfg.on_missing)
        else:
            splits[split] = load_seedbench(path, cfg.data_root, seed=cfg.seed, on_missing=cfg.on_missing)
    skipped = {name: s.skipped for name, s in splits.items()}
    if cfg.limit:
        splits = {name: s[:cfg.limit] for name, s in splits.items()}
    return splits, skipped


def identity(cfg: Config, dtype, processor) -> dict:
    """Everything that changes an answer (sbr/provenance.py compares it on every rerun)."""
    return {"model": provenance.model_identity(cfg.model), "benchmark": cfg.benchmark,
            "decoding": {"method": "greedy", "max_new_tokens": cfg.max_new_tokens, "stop_tokens": cfg.stop_tokens,
                         "suppressed": visual_token_ids(processor.tokenizer)},
            "frames": {"max_frames": cfg.max_frames, "fps": 2.0, "frame_size": cfg.frame_size},
            "dtype": str(dtype).removeprefix("torch."), "prompt_sha256": fingerprint(processor),
            "eval_version": EVAL_VERSION, "seed": cfg.seed,
            "data": {split: provenance.file_sha256(path) for split, path in split_files(cfg).items()}}


def run_info(cfg: Config, world_size: int) -> dict:
    """Recorded beside the identity, never compared: a rerun may change these."""
    import transformers
    return {"model_path": os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model,
            "batch_size": cfg.batch_size, "compile_decode": cfg.compile_decode, "world_size": world_size,
            "torch": torch.__version__,
            "transformers": transformers.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


@torch.no_grad()
def decode(policy, batch: dict, tokenizer, cfg: Config, device, dtype):
    """Greedy completions of a left-padded batch as a sbr.rollout.Rollout (sbr's loop: each prompt
    prefilled once, the argmax at every step, visual tokens never emitted, stopping at `cfg.stop_tokens`)."""
    return rollout.sample(policy, model_inputs(batch, device, dtype), 1, max_new_tokens=cfg.max_new_tokens,
                          greedy=True, eos_token_ids=tokenizer.convert_tokens_to_ids(cfg.stop_tokens),
                          pad_token_id=tokenizer.pad_token_id)


def generate(policy, batch: dict, tokenizer, cfg: Config, device, dtype) -> list[str]:
    """The completions' text (decode)."""
    out = decode(policy, batch, tokenizer, cfg, device, dtype)
    return tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)


def measure_attention(policy, batch: dict, out, tokenizer, cfg: Config, device, dtype, examples: set) -> list[dict]:
    """The attention records of a decoded batch (sbr/attention.py), maps for the `examples` ids."""
    inputs = model_inputs(batch, device, dtype)
    queries, fallback = query_mask(tokenizer, out.completion_ids, out.completion_mask, cfg.attention_tokens)
    a = prompt_attention(policy, inputs, out.completion_ids, queries, cfg.attention_layers)
    ids = [s.sample_id for s in batch["samples"]]
    recs = shares(a, inputs, tokenizer.convert_tokens_to_ids("<|video_pad|>"),
                  tokenizer.convert_tokens_to_ids("<|image_pad|>"), maps=[i in examples for i in ids])
    n = out.completion_mask.sum(1).tolist()
    return [{"sample_id": i, "clip": s.video or s.image, "completion_ids": out.completion_ids[b, :n[b]].tolist(),
             "tokens": int(queries[b].sum()), "fallback": bool(fallback[b]), **r}
            for b, (i, s, r) in enumerate(zip(ids, batch["samples"], recs))]


def main(cfg: Config) -> dict:
    check_config(cfg)
    if cfg.compare:                                # paired statistics of finished evaluations: no model
        text = paired_comparison(cfg.compare, common=cfg.compare_common)
        looks = attention.comparison(cfg.compare, [os.path.basename(os.path.normpath(d)) for d in cfg.compare])
        text += "\n\n" + looks if looks else ""
        print(text)
        return {"comparison": text}
    prefetch(cfg.model)                             # a hub id's files, before any collective could wait on them
    d = init_distributed(timeout_minutes=cfg.timeout_minutes)
    seed_everything(cfg.seed)
    data = "longvideobench" if cfg.benchmark == "longvideobench" else "demo"
    model, data_root = fill_defaults(cfg.model, cfg.data_root, cfg.tiny_dir, data=data)
    cfg = replace(cfg, model=model, data_root=data_root,
                  frame_size=resolve_frame_size(cfg.frame_size, model, cfg.trust_remote_code))
    name = os.path.basename(os.path.normpath(cfg.model))
    if name == "export":                            # a training run's export: name it after the run
        name = os.path.basename(os.path.dirname(os.path.normpath(cfg.model)))
    out_dir = cfg.out_dir or os.path.join("runs", "eval", name + ("_lvb" if cfg.benchmark == "longvideobench" else ""))
    dtype = {"auto": torch.bfloat16 if d.device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    letters = "ABCDE" if cfg.benchmark == "longvideobench" else "ABCD"

    # ------------------------------------------------------------------ data, what made the predictions, model
    splits, skipped = load_splits(cfg)
    processor = load_processor(cfg.model, trust_remote_code=cfg.trust_remote_code)
    token_ids(processor.tokenizer, cfg.stop_tokens, "stop_tokens")
    error = None
    if d.is_main:                                   # rank 0 checks out_dir against this run, the others wait
        try:
            checked = provenance.check(out_dir, identity(cfg, dtype, processor), overwrite=cfg.overwrite)
        except provenance.ProvenanceError as e:
            error = str(e)
    raise_everywhere(error)
    # on the device directly, tensor by tensor: no rank holds a host copy of the weights (sbr/sharded.py)
    model = load_on_device(cfg.model, dtype=dtype, device=d.device, trust_remote_code=cfg.trust_remote_code).eval()
    record = provenance.write(out_dir, checked, run_info(cfg, d.world_size), overwrite=cfg.overwrite) if d.is_main else None
    if dist.is_initialized():
        dist.barrier()                              # the record is there before any rank's first prediction
    layers = model.config.text_config.num_hidden_layers
    if any(not 0 <= i < layers for i in cfg.attention_layers) or len(set(cfg.attention_layers)) < len(cfg.attention_layers):
        raise ConfigError(f"--attention_layers {' '.join(map(str, cfg.attention_layers))}: expected distinct layers "
                          f"0..{layers - 1} of this model")
    policy = Policy(model, suppress_token_ids=visual_token_ids(processor.tokenizer),
                    compile_decode=cfg.compile_decode).eval()
    collator = VideoCollator(processor, padding_side="left", frame_size=cfg.frame_size, max_frames=cfg.max_frames)
    print0(f"model {cfg.model} ({type(model).__name__}, {dtype}, {model.config._attn_implementation}: "
           f"{choose_attention(dtype)[1]}) "
           f"on {d.world_size} x {d.device.type}; writing {out_dir}")

    # ------------------------------------------------------------------ decode what is not done yet
    unreadable = {split: [] for split in splits}       # this rank's questions skipped for unreadable media
    if cfg.attention:
        attention_settings(out_dir, cfg, d)
    for split, samples in splits.items():
        done, _ = read_predictions(prediction_files(out_dir, split))
        examples = {s.sample_id for s in samples[:cfg.attention_examples]}
        if cfg.attention:                           # done once its attention is recorded too (maps for an example)
            measured, _ = read_predictions(prediction_files(out_dir, split, "attention"))
            drawn = {key(i) for i in examples}
            done = {k: v for k, v in done.items() if k in measured
                    and (k not in drawn or "video_maps" in measured[k] or "image_map" in measured[k])}
        remaining = [s for s in samples if key(s.sample_id) not in done]
        if dist.is_initialized():
            dist.barrier()      # every rank shards the same snapshot before any rank writes more
        todo = remaining[d.rank::d.world_size]
        print0(f"{split}: {len(samples)} questions, {len(remaining)} to do"
               + (f", {len(skipped[split])} skipped for missing media" if skipped[split] else ""))
        dataset = SampleDataset(todo, collator, on_bad=cfg.on_missing)      # skip: unreadable media -> counted
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=drop_bad(collator),
                                             num_workers=cfg.num_workers if todo else 0)
        writer = PredictionWriter(out_dir, split, d.rank)
        looks = PredictionWriter(out_dir, split, d.rank, "attention") if cfg.attention else None
        progress = Progress(len(todo) * d.world_size, split, enabled=d.is_main)
        for batch in loader:
            for s in batch["skipped"]:
                print(f"\nskipped, unreadable media: {s['error']}", flush=True)
            unreadable[split] += [s["error"] for s in batch["skipped"]]
            if not batch["samples"]:
                continue
            if cfg.attention:
                out = decode(policy, batch, processor.tokenizer, cfg, d.device, dtype)
                responses = processor.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
                measured = measure_attention(policy, batch, out, processor.tokenizer, cfg, d.device, dtype, examples)
            else:
                responses = generate(policy, batch, processor.tokenizer, cfg, d.device, dtype)
            rows = []
            for sample, response in zip(batch["samples"], responses):
                extracted = extract_answer(response, letters)
                rows.append({"sample_id": sample.sample_id, "response": response, "extracted": extracted,
                             "answer": sample.answer, "correct": extracted == sample.answer,
                             "level": sample.level, "domain": sample.domain,
                             "duration_group": sample.duration_group, "question_category": sample.question_category})
            writer.write(rows)
            if cfg.attention:                       # after its prediction: a torn pair is redone whole
                looks.write([{"split": split, "level": r["level"], "domain": r["domain"], "correct": r["correct"], **m}
                             for r, m in zip(rows, measured)])
            progress.update(rows, d.world_size)
        writer.close()
        if looks:
            looks.close()
        progress.close()
    if dist.is_initialized():
        everyone = [None] * d.world_size
        dist.all_gather_object(everyone, unreadable)
        unreadable = {split: [e for part in everyone for e in part[split]] for split in splits}

    # ------------------------------------------------------------------ merge and tabulate (rank 0)
    results = {}
    if d.is_main:
        merged, torn_total = {}, 0
        for split, samples in splits.items():
            rows, torn = read_predictions(prediction_files(out_dir, split))
            torn_total += torn
            merged[split] = [rows[key(s.sample_id)] for s in samples if key(s.sample_id) in rows]
            with open(os.path.join(out_dir, f"predictions_{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in merged[split])
        if cfg.benchmark == "longvideobench":
            table, title = longvideobench_table(merged["longvideobench"]), "LongVideoBench (Table 3)"
        else:
            table, title = seedbench_table(merged), "SEED-Bench-R1 (Table 2 layout)"
        results = {"model": cfg.model, "benchmark": cfg.benchmark, "table": table,
                   "skipped_missing_media": {s: [list(x) for x in v] for s, v in skipped.items()},
                   "skipped_unreadable_media": unreadable,
                   "torn_lines_recomputed": torn_total, "config": asdict(cfg), "provenance": record}
        text = f"## {title}: accuracy %\n\n{markdown(table, name)}\n"
        n_skipped = sum(len(v) for v in skipped.values()) + sum(len(v) for v in unreadable.values())
        if n_skipped:
            text += f"\n{n_skipped} questions skipped for missing or unreadable media (listed in results.json)\n"
        if cfg.benchmark == "longvideobench":
            results["categories"] = category_table(merged["longvideobench"])
            text += f"\n## LongVideoBench by question category: accuracy %\n\n{markdown(results['categories'], name)}\n"
        if cfg.attention:
            results["attention"], drawn = tabulate_attention(out_dir, splits, merged, cfg, processor, collator)
            text += ("\n## Where the reasoning looks (attention from the generated tokens; mean and bootstrap 95% "
                     f"interval)\n\n{attention.markdown(results['attention'])}\n"
                     + (f"\n{drawn} questions drawn in {os.path.join(out_dir, 'attention_examples')}\n" if drawn else ""))
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(text)
        print0("\n" + text)
        print0(shown(results, splits, cfg.model))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return results


def attention_settings(out_dir: str, cfg: Config, d) -> None:
    """The attention records' settings, written once; a rerun with others is refused (never a mix)."""
    path = os.path.join(out_dir, "attention", "settings.json")
    mine = {"layers": cfg.attention_layers, "tokens": cfg.attention_tokens, "version": 1}
    error = None
    if d.is_main:
        try:                                        # every failure reaches the other ranks as a message
            theirs = None
            if os.path.exists(path):
                with open(path) as f:
                    theirs = json.load(f)
            if theirs is not None and theirs != mine and not cfg.overwrite:
                error = (f"{path}: these attention records were made with {theirs}, this run asks {mine}: the "
                         "same --attention_layers and --attention_tokens, another --out_dir, or --overwrite true")
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(mine, f)
        except (OSError, ValueError) as e:
            error = f"{path}: {e}"
    raise_everywhere(error)


def raise_everywhere(error: str | None) -> None:
    """Rank 0's verdict on out_dir (None: fine) reaches every rank, which all raise it together: none is
    left waiting in a collective for a rank that stopped."""
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise provenance.ProvenanceError(error)


def tabulate_attention(out_dir: str, splits: dict, merged: dict, cfg: Config, processor, collator) -> tuple[dict, int]:
    """attention.jsonl (every split, in order), the table by the accuracy table's columns, and the
    pictures of the example questions (how many were drawn)."""
    rows = []
    for split, samples in splits.items():
        got, _ = read_predictions(prediction_files(out_dir, split, "attention"))
        rows += [got[key(s.sample_id)] for s in samples if key(s.sample_id) in got]
    with open(os.path.join(out_dir, "attention.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tagged = {split: [{**r, "sample_id": (split, r["sample_id"])} for r in rs] for split, rs in merged.items()}
    cells = longvideobench_cells(tagged["longvideobench"]) if cfg.benchmark == "longvideobench" else seedbench_cells(tagged)
    tab = attention.table([{**r, "sample_id": (r["split"], r["sample_id"])} for r in rows],   # ids repeat across splits
                          {c: [r["sample_id"] for r in rs] for c, rs in cells.items()})
    drawn = 0
    if cfg.attention_examples:
        from sbr.figures import attention_picture
        by_id = {(r["split"], r["sample_id"]): r for r in rows}
        for split, samples in splits.items():
            for s in samples[:cfg.attention_examples]:
                if (split, s.sample_id) in by_id:
                    rec = by_id[(split, s.sample_id)]
                    text = processor.tokenizer.decode(rec["completion_ids"], skip_special_tokens=True)
                    attention_picture(collator.load(s), rec, text,
                                      os.path.join(out_dir, "attention_examples", f"{split}_{s.sample_id}.png"))
                    drawn += 1
    return tab, drawn


class Progress:
    """Questions done, questions a second and running accuracy, on one line (rank 0's shard,
    scaled by the number of ranks for the total)."""
    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.done = self.correct = 0
        self.start = time.time()

    def update(self, rows: list[dict], world_size: int) -> None:
        self.done += len(rows) * world_size
        self.correct += sum(r["correct"] for r in rows) * world_size
        if self.enabled:
            rate = self.done / max(time.time() - self.start, 1e-9)
            bar = "#" * int(20 * self.done / max(self.total, 1))
            print(f"\r{self.label} [{bar:<20}] {self.done}/{self.total} {rate:.2f} q/s "
                  f"acc {100 * self.correct / self.done:.1f}%", end="", flush=True)

    def close(self):
        if self.enabled and self.done:
            print(flush=True)


def demo_config() -> Config:
    """With no --data_root on SEED-Bench-R1: the tiny default's demonstration data (sbr/demo.py), read
    at their own 56-pixel size, with answers as long as its training's (32 new tokens)."""
    return Config(frame_size=56, max_new_tokens=32, batch_size=32, num_workers=0)


def preset(given: dict) -> Config | None:
    """With no --data_root on SEED-Bench-R1, the tiny default's demonstration data, read as it was made,
    stand in for the defaults."""
    return None if given.get("data_root") or given.get("benchmark", "seedbench") != "seedbench" else demo_config()


def shown(results: dict, samples: dict, model: str) -> str:
    """The closing line: the accuracies against chance (the mean of 1 / options over the questions),
    and, for a training run's export, how its training went (sbr.results.training_summary)."""
    chance = 100 * sum(1 / len(s.options) for ss in samples.values() for s in ss) / max(1, sum(map(len, samples.values())))
    cells = ", ".join(f"{col} {cell['accuracy']:.1f}%" for col, cell in results["table"].items()
                      if col in ("L1", "L2", "L3 overall", "overall") and cell.get("accuracy") is not None)
    run = os.path.dirname(os.path.normpath(model)) if os.path.basename(os.path.normpath(model)) == "export" else ""
    trained = training_summary(run) if run else None
    return f"accuracy: {cells} (chance: {chance:.1f}%)" + (f"; {trained}" if trained else "")


if __name__ == "__main__":
    cli.run(main, Config, preset=preset)
