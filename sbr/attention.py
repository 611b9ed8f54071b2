r"""Where the reasoning looks: the attention from the generated tokens to the prompt's video, image and
text, measured over whole splits (the paper's Figures 4-6 show three hand-picked cases, and the
authors released no code for them; every choice below is sbr's).

For a question with prompt positions j (left padding included, which gets no attention) and the
generated tokens T it chooses (`tokens`: "think", those spelling the content of <think>...</think>, or
"all"; a completion with no <think> block falls back to all), one forward over prompt + completion with
eager attention in the language model (for this pass only: SDPA and flash-attn return no weights)
gives, over the chosen layers ℓ (default all) and the H heads,
    a_j = 1/|ℓ| Σ_ℓ 1/|T| Σ_{t∈T} 1/H Σ_h A^{ℓ,h}_{t,j}
the attention each generated token pays position j, averaged; the query of o_t is the row at o_t's own
position (the one that reads o_t and predicts o_{t+1}). A hook on each chosen layer reduces its
(B, H, L, L) weights to (B, P) during its forward, one head at a time, so no layer's weights outlive it.
Eager attention holds its scores in bf16 and their softmax in fp32 for a moment: ~6 B x H x L² a
question, at 7B (H = 28, L = 900 + 256) 225 MB, 1.8 GB for a batch of 8, beside the 16.6 GB model; the
pass costs one more forward over prompt + completion a question.
Shares, per question:
    video  Σ a_j over each temporal grid's tokens (2 frames a grid), in time order
    image  Σ a_j over the observation image's tokens
    text   Σ a_j over the rest of the prompt (template, question, options, special tokens)
video + image + text = the attention on the prompt (the rest is on the completion itself).
How evenly the reasoning covers the clip: the normalised entropy of v = video / Σ video,
H(v) / ln G over G temporal grids (1: uniform, 0: one grid), and the fraction of grids with
v_g >= 1 / (2 G) (at least half the uniform share). The absolute shares shrink as a completion grows
(token t spreads its attention over P + t keys) and the text share holds the first token's attention
sink, so `visual_of_prompt` = (video + image) / (the prompt's total) is reported too; the table gives
the tokens measured and how many completions fell back to all tokens.
"""
import math

import numpy as np
import torch

from sbr.rewards import THINK, span_token_mask

MEASURES = ("visual", "visual_of_prompt", "video", "evenness", "coverage", "tokens")   # per question; tabled


def query_mask(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor, tokens: str) -> tuple:
    """(B, C) 1 on the generated tokens whose attention is measured (module docstring), and (B,) bool:
    the row fell back to all its tokens (tokens="think" but no complete <think> block, e.g. cut off)."""
    if tokens == "all":
        return completion_mask.clone(), torch.zeros(completion_mask.shape[0], dtype=torch.bool)
    think = span_token_mask(tokenizer, completion_ids.cpu(), completion_mask.cpu(), THINK).to(completion_mask.device)
    none = think.sum(1, keepdim=True) == 0
    return torch.where(none, completion_mask, think), none[:, 0].cpu()


@torch.no_grad()
def prompt_attention(policy, inputs: dict, completion_ids: torch.Tensor, queries: torch.Tensor,
                     layers: list[int] | None = None) -> torch.Tensor:
    """a (B, P) fp32 (module docstring): inputs the left-padded prompt batch, completion_ids (B, C)
    right-padded, queries (B, C) the generated tokens measured."""
    text = policy.inner.language_model
    chosen = list(range(len(text.layers))) if not layers else list(layers)
    B, P = inputs["input_ids"].shape
    q = queries.float()                                                       # (B, C)
    total = torch.zeros(B, P, device=q.device)

    def reduce(module, args, output):                                         # (B, H, P+C, P+C) -> (B, P)
        w = output[1]
        for h in range(w.shape[1]):                       # one head at a time: a (B, C, P) fp32 transient
            total.add_((w[:, h, P:, :P].float() * q[:, :, None]).sum(1), alpha=1 / w.shape[1])
    config, before = text.config, text.config._attn_implementation
    hooks = []
    try:
        hooks += [text.layers[i].self_attn.register_forward_hook(reduce) for i in chosen]
        config._attn_implementation = "eager"
        policy.logprobs(inputs, completion_ids, 1, share_prompt=False)
    finally:
        config._attn_implementation = before
        for h in hooks:
            h.remove()
    return total / len(chosen) / q.sum(1, keepdim=True).clamp(min=1)         # (B, P)


def shares(a: torch.Tensor, inputs: dict, video_token: int, image_token: int, merge: int = 2,
           maps: bool | list[bool] = False) -> list[dict]:
    """Per question of the batch: its video shares by temporal grid, image and text shares (and, where
    `maps` (one flag, or one a question) says, each grid's and the image's (h, w) maps of merged tokens)."""
    maps = maps if isinstance(maps, list) else [maps] * inputs["input_ids"].shape[0]
    ids, keep = inputs["input_ids"], inputs["attention_mask"].bool()
    vgrids = inputs.get("video_grid_thw")
    igrids = inputs.get("image_grid_thw")
    nv = ni = 0                                        # grids used so far (they follow the batch's questions)
    out = []
    for b in range(ids.shape[0]):
        row, on_video, on_image = a[b], ids[b] == video_token, ids[b] == image_token
        rec = {"video": [], "image": None, "text": float(row[keep[b] & ~on_video & ~on_image].sum())}
        if on_video.any():
            t, h, w = (int(x) for x in vgrids[nv])
            nv += 1
            v = row[on_video].view(t, h // merge, w // merge)                 # time, then rows of merged tokens
            rec["video"] = v.sum((1, 2)).tolist()
            if maps[b]:
                rec["video_maps"] = v.tolist()
        if on_image.any():
            _, h, w = (int(x) for x in igrids[ni])
            ni += 1
            im = row[on_image]
            rec["image"] = float(im.sum())
            if maps[b]:
                rec["image_map"] = im.view(h // merge, w // merge).tolist()
        out.append(rec)
    return out


def measures(rec: dict) -> dict:
    """The per-question measures of MEASURES from a record's shares (None where they do not apply)."""
    video = [max(x, 0.0) for x in rec["video"]]
    total = sum(video)
    visual = total + (rec["image"] or 0.0)
    prompt = visual + rec["text"]
    out = {"visual": visual, "visual_of_prompt": visual / prompt if prompt > 0 else None,
           "video": total if video else None, "evenness": None, "coverage": None, "tokens": rec.get("tokens")}
    if len(video) >= 2 and total > 0:
        v = [x / total for x in video]
        out["evenness"] = -sum(x * math.log(x) for x in v if x > 0) / math.log(len(v))
        out["coverage"] = sum(x >= 0.5 / len(v) for x in v) / len(v)
    return out


def mean_interval(xs: list[float], clusters: list | None = None, reps: int = 4000,
                  seed: int = 0) -> tuple[float, float, float] | None:
    """(mean, 2.5%, 97.5%) of a bootstrap that resamples `clusters` whole (questions on the same video
    are not independent; default each value its own), seeded. None for fewer than 2 values."""
    if len(xs) < 2:
        return None
    x = np.asarray(xs, dtype=np.float64)
    labels = list(range(len(xs))) if clusters is None else clusters
    index = {c: i for i, c in enumerate(dict.fromkeys(labels))}
    group = np.array([index[c] for c in labels])
    sums, counts = np.bincount(group, weights=x), np.bincount(group).astype(np.float64)
    pick = np.random.default_rng(seed).integers(0, len(sums), size=(reps, len(sums)))
    boot = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(x.mean()), float(lo), float(hi)


def table(rows: list[dict], columns: dict[str, list[str]]) -> dict:
    """{column: {measure: (mean, lo, hi) or None, "questions": n}} over the records whose sample_id each
    column lists (the accuracy table's columns: levels and L3 domains)."""
    by_id = {r["sample_id"]: (measures(r), r.get("clip"), r.get("fallback", False)) for r in rows}
    out = {}
    for col, ids in columns.items():
        got = [by_id[i] for i in ids if i in by_id]
        cell = {"questions": len(got), "fallback": sum(f for _, _, f in got)}
        for m in MEASURES:
            kept = [(g[m], clip) for g, clip, _ in got if g[m] is not None]
            cell[m] = mean_interval([v for v, _ in kept], [c for _, c in kept] if all(c for _, c in kept) else None)
        out[col] = cell
    return out


def markdown(tab: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})"
    cols = list(tab)
    lines = ["| measure | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {m} | " + " | ".join(cell(tab[c][m]) for c in cols) + " |" for m in MEASURES]
    lines.append("| questions | " + " | ".join(str(tab[c]["questions"]) for c in cols) + " |")
    lines.append("| of them on all tokens (no <think> block) | " + " | ".join(str(tab[c]["fallback"]) for c in cols) + " |")
    return "\n".join(lines)


def paired(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """{measure: (mean of B - A over the questions both measured, 2.5%, 97.5%) or None, "questions": n}."""
    a = {r["sample_id"]: measures(r) for r in rows_a}
    b = {r["sample_id"]: measures(r) for r in rows_b}
    clip = {r["sample_id"]: r.get("clip") for r in rows_a}
    both = sorted(a.keys() & b.keys(), key=str)
    out = {"questions": len(both)}
    for m in MEASURES:
        keys = [k for k in both if a[k][m] is not None and b[k][m] is not None]
        clusters = [clip[k] for k in keys] if all(clip[k] for k in keys) else None
        out[m] = mean_interval([b[k][m] - a[k][m] for k in keys], clusters)
    return out


def comparison(run_dirs: list[str], names: list[str]) -> str:
    """Each run's attention measures against the first's, per question (the questions both measured),
    split by split: the mean paired difference with its bootstrap 95% interval. "" when a run has no
    attention.jsonl."""
    import json
    import os
    paths = [os.path.join(d, "attention.jsonl") for d in run_dirs]
    if not all(os.path.exists(p) for p in paths):
        return ""
    settings = []
    for d in run_dirs:
        with open(os.path.join(d, "attention", "settings.json"), encoding="utf-8") as f:
            settings.append(json.load(f))
    if any(x != settings[0] for x in settings):
        raise ValueError("--compare: the runs' attention was measured with other settings ("
                         + "; ".join(f"{d}: {x}" for d, x in zip(run_dirs, settings))
                         + "): measure them alike (--attention_layers, --attention_tokens)")
    runs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            runs.append([json.loads(line) for line in f])
    out = []
    for name, rows in zip(names[1:], runs[1:]):
        out += [f"### Where the reasoning looks: {name} - {names[0]} (per question, paired)", "",
                "| split | questions | " + " | ".join(MEASURES) + " |", "|---|---|" + "---|" * len(MEASURES)]
        for split in dict.fromkeys(r["split"] for r in runs[0]):
            diff = paired([r for r in runs[0] if r["split"] == split], [r for r in rows if r["split"] == split])
            cells = ["-" if diff[m] is None else f"{diff[m][0]:+.3f} ({diff[m][1]:+.3f} to {diff[m][2]:+.3f})"
                     for m in MEASURES]
            out.append(f"| {split} | {diff['questions']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
