"""A memory plan before launch: what each GPU will hold, line by line, against its memory.

Counts come from the model built on the meta device (nothing allocated), bytes from how sbr runs:
FSDP2 over S ranks (S = world size, or --shard_group_size for HSDP), P parameters of which the root
unit (embeddings, final norm, LM head) holds R, a decoder layer Y and the vision tower V.

    policy parameters     4P/S     fp32 master shards
    gradients             4P/S     fp32 shards (training only; freed by the optimizer step)
    AdamW state           8P/S     exp_avg and exp_avg_sq, fp32
    reference             2P/S     bf16 shards, no gradients (GRPO with beta > 0)
    rollout weights       2P       every unit gathered in bf16 for the whole rollout (sbr.fsdp.gathered)
    rollout KV cache      (Q p + N c) L 2 k d 2   each of Q questions' p prompt tokens once (shared by its G
                                   rows, sbr/decode.py), each of N = Q G rows' c completion tokens,
                                   L layers, k KV heads of d dims, K and V, bf16
    rollout logits        3 N V 4  fp32 logits, their softmax and log-softmax for one step
    training gathered     2 (R + max(V + Y, 2Y))  the root stays gathered through forward and backward,
                                   with the vision tower and a decoder layer, or two layers (prefetch)
    training activations  (estimate, activation checkpointing on) for T = m (p + G c) positions of a
                                   micro-batch of m questions: each layer's input T H 2 L, the prompt's K/V
                                   kept once and repeated for the G rows (m + m G) p L 2 k d 2, one layer
                                   recomputed with its gradients 2 T (4H + 3I) 2, an LM-head chunk 3 C V 4
                                   (C = --logprob_chunk), the vision tower's inputs per block 2 v E B;
                                   without checkpointing every layer's intermediates are kept: x L
    CUDA context, NCCL, allocator slack: 2 GiB, fixed

Peak = the larger of the rollout (parameters, AdamW, reference, rollout weights, KV cache, logits)
and the training phase (parameters, gradients, AdamW, reference, gathered units, activations).
"""
from dataclasses import dataclass, field

import torch

GIB = 2**30
FIXED = 2 * GIB


@dataclass
class Sizes:
    """What the plan needs to know of a model."""
    total: int          # P
    root: int           # R: parameters outside the decoder layers and the vision tower
    layer: int          # Y: one decoder layer
    vision: int         # V: the vision tower
    layers: int         # L
    hidden: int         # H
    intermediate: int   # I
    kv_heads: int       # k
    head_dim: int       # d
    vocab: int
    vision_width: int   # E
    vision_blocks: int  # B


def model_sizes(config) -> Sizes:
    """Count a Qwen2-VL / Qwen2.5-VL configuration's parameters on the meta device."""
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = lambda module: sum(p.numel() for p in module.parameters())   # noqa: E731
    text, vision = config.text_config, config.vision_config
    total, layer, tower = count(model), count(model.model.language_model.layers[0]), count(model.model.visual)
    return Sizes(total=total, root=total - text.num_hidden_layers * layer - tower, layer=layer, vision=tower,
                 layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                 kv_heads=text.num_key_value_heads, head_dim=text.hidden_size // text.num_attention_heads,
                 vocab=text.vocab_size, vision_width=getattr(vision, "embed_dim", None) or vision.hidden_size,
                 vision_blocks=vision.depth)


def prompt_tokens(frame_size: int, max_frames: int, text: int = 171) -> tuple[int, int]:
    """(visual tokens, prompt tokens): max_frames frames in groups of 2 and the observation image, each
    (frame_size / 28)^2 merged tokens; `text` = the template, question and options (~171 for
    SEED-Bench-R1: 900 tokens in all at 16 frames of 252x252)."""
    per_frame = (frame_size // 28) ** 2
    visual = (max_frames // 2) * per_frame + per_frame
    return visual, visual + text


@dataclass
class Plan:
    lines: list = field(default_factory=list)       # (phase, name, bytes, how)

    def add(self, phase: str, name: str, nbytes: float, how: str) -> None:
        self.lines.append((phase, name, int(nbytes), how))

    def total(self, phase: str) -> int:
        return sum(b for p, _, b, _ in self.lines if p in ("both", phase))

    def peak(self) -> tuple[str, int]:
        phases = sorted({p for p, *_ in self.lines if p != "both"})
        return max(((p, self.total(p)) for p in phases), key=lambda x: x[1])

    def render(self, gpu_bytes: int, title: str, advice: list[str]) -> str:
        out = [f"memory plan, {title}, per GPU (GiB):"]
        for phase, name, nbytes, how in self.lines:
            out.append(f"  {phase:8s} {name:22s} {nbytes / GIB:7.2f}   {how}")
        for phase in sorted({p for p, *_ in self.lines if p != "both"}):
            out.append(f"  {phase:8s} {'total':22s} {self.total(phase) / GIB:7.2f}")
        phase, peak = self.peak()
        verdict = "fits" if peak <= gpu_bytes else "DOES NOT FIT"
        out.append(f"  peak: {peak / GIB:.2f} GiB in the {phase} phase, of {gpu_bytes / GIB:.1f} GiB: {verdict} "
                   f"({(gpu_bytes - peak) / GIB:+.2f} GiB)")
        if peak > gpu_bytes:
            out += ["  WARNING: this run will run out of GPU memory. To lower the peak:"] + [f"    - {a}" for a in advice]
        return "\n".join(out)


def _shared(plan: Plan, s: Sizes, S: int, optimizer_phase: str) -> None:
    plan.add("both", "policy parameters", 4 * s.total / S, f"fp32 shards: 4 x {s.total:,} / {S}")
    plan.add(optimizer_phase, "gradients", 4 * s.total / S, "fp32 shards")
    plan.add("both", "AdamW state", 8 * s.total / S, "exp_avg + exp_avg_sq, fp32 shards")


def _activations(s: Sizes, T: int, prompt_kv_rows: int, p: int, checkpointing: bool, chunk: int,
                 vision_tokens: int) -> float:
    kv = 2 * s.kv_heads * s.head_dim * 2                                     # K and V, bf16, per token per layer
    saved = T * s.hidden * 2 * s.layers + prompt_kv_rows * p * s.layers * kv + 2 * vision_tokens * s.vision_width * s.vision_blocks
    layer = 2 * T * (4 * s.hidden + 3 * s.intermediate) * 2
    head = 3 * chunk * s.vocab * 4
    return saved + (layer if checkpointing else layer * s.layers) + head


def grpo_plan(s: Sizes, *, shard: int, G: int, questions: int, micro_questions: int, prompt: int, visual: int,
              completion: int, beta: float, checkpointing: bool, chunk: int, reference: str | None = None) -> Plan:
    """reference: "frozen" (bf16 shards), "ema" (GRPO-CARE's, fp32 shards), "none"; None: frozen when
    beta > 0, else none."""
    plan = Plan()
    _shared(plan, s, shard, "training")
    reference = reference or ("frozen" if beta else "none")
    if reference == "ema":
        plan.add("both", "reference", 4 * s.total / shard, "fp32 shards, an EMA of the policy (GRPO-CARE)")
    elif reference == "frozen":
        plan.add("both", "reference", 2 * s.total / shard, "bf16 shards, frozen")
    N = questions * G
    kv = 2 * s.kv_heads * s.head_dim * 2
    plan.add("rollout", "rollout weights", 2 * s.total, "all units gathered in bf16 for the rollout")
    plan.add("rollout", "rollout KV cache", (questions * prompt + N * completion) * s.layers * kv,
             f"({questions} x {prompt} prompt + {N} x {completion} tokens) x {s.layers} layers x {kv} B")
    plan.add("rollout", "rollout logits", 3 * N * s.vocab * 4, "fp32 logits, softmax, log-softmax of a step")
    plan.add("training", "gathered units", 2 * (s.root + max(s.vision + s.layer, 2 * s.layer)),
             "bf16: root + vision + a layer (or two layers)")
    m = micro_questions
    T = m * (prompt + G * completion)
    plan.add("training", "activations", _activations(s, T, m + m * G, prompt, checkpointing, chunk, m * visual * 4),
             f"estimate: {T} positions a micro-batch, checkpointing {'on' if checkpointing else 'off'}")
    plan.add("both", "CUDA context, NCCL", FIXED, "fixed allowance")
    return plan


def sft_plan(s: Sizes, *, shard: int, micro_batch: int, max_length: int, visual: int, checkpointing: bool,
             chunk: int) -> Plan:
    plan = Plan()
    _shared(plan, s, shard, "training")
    plan.add("training", "gathered units", 2 * (s.root + max(s.vision + s.layer, 2 * s.layer)),
             "bf16: root + vision + a layer (or two layers)")
    T = micro_batch * max_length
    plan.add("training", "activations", _activations(s, T, 0, 0, checkpointing, chunk, micro_batch * visual * 4),
             f"estimate: {T} positions (micro-batch x max_length, the worst case)")
    plan.add("both", "CUDA context, NCCL", FIXED, "fixed allowance")
    return plan


GRPO_ADVICE = ["--questions_per_rank 1 and --micro_batch_questions 1 (the rollout KV cache and activations scale with them)",
               "a shorter --max_completion_length",
               "--activation_checkpointing true",
               "more GPUs, or GPUs with more memory: every sharded line shrinks with the world size; the rollout's "
               "gathered bf16 weights (2P) do not",
               "--beta 0 drops the reference (GRPO-CARE still needs it: --consistency_bonus)"]
SFT_ADVICE = ["--micro_batch_size 1 (raise the accumulation instead; the result is the same)",
              "a shorter --max_length", "--activation_checkpointing true", "more GPUs"]


def device_bytes(default_gib: float) -> tuple[int, str]:
    """This machine's GPU memory, or `default_gib` for planning on a machine without one."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, props.name
    return int(default_gib * GIB), f"{default_gib:g} GiB (planned; no GPU here)"


def decode_step_bytes(s: Sizes, *, questions: int, prompt: int, G: int, completion: int, dtype_bytes: int = 2) -> dict:
    """What one decoding step must read, averaged over a `completion`-token rollout: the language
    model's weights once (decoder layers, final norm, LM head; of the embedding only N rows, left out),
    each question's prompt K/V once (shared by its G rows, sbr/decode.py), each row's own K/V (t + 1
    tokens at step t, (c + 1) / 2 on average). Over a device's read bandwidth this is the step's floor.
    Qwen2-VL-7B, 1 question x G = 8, 900 + 256 tokens, bf16: 14.14 GB + 51.6 MB + 59.0 MB."""
    kv = s.layers * 2 * s.kv_heads * s.head_dim * dtype_bytes                  # bytes a token, all layers
    return {"weights": (s.layers * s.layer + s.vocab * s.hidden + s.hidden) * dtype_bytes,
            "prompt_kv": questions * prompt * kv, "own_kv": questions * G * (completion + 1) / 2 * kv}
