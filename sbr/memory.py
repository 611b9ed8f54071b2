"""A memory plan before launch: what each GPU will hold, line by line, against its memory.

Counts come from the model built on the meta device (nothing allocated), bytes from how sbr runs:
FSDP2 over S ranks (S = world size, or --shard_group_size for HSDP), P parameters of which the root
unit (embeddings, final norm, LM head) holds R, a decoder layer Y and the vision tower V. A step passes
through moments ("phases") whose memory differs; a line belongs to one or several of them:

  every phase
    policy parameters     4P/S     fp32 master shards
    AdamW state           8P/S     exp_avg and exp_avg_sq, fp32
    reference             2P/S     bf16 shards, no gradients (GRPO with beta > 0; 4P/S for an EMA)
    CUDA context, NCCL, allocator slack: 2 GiB, fixed
  prefill (GRPO: the rollout's first forward, every unit gathered by sbr.fsdp.gathered)
    rollout weights       2P       every unit in bf16
    all-gather copy       2Y       FSDP2 all-gathers a unit into one buffer, then copies it into the
                                   parameters: two copies of the last layer for a moment on top of the
                                   rest (the root's two copies, 4R, come first, with nothing else gathered)
    prompt K/V            Q p L 2 k d 2   the prefill's cache: Q questions' p prompt tokens, L layers,
                                   k KV heads of d dims, K and V, bf16
  decoding
    decoding weights      2(P - V) the vision tower resharded after the prefill (sbr.fsdp.release)
    rollout KV cache      (Q p + N c) L 2 k d 2   each prompt once (shared by its G rows, sbr/decode.py)
                                   and each of N = Q G rows' c completion tokens
    rollout logits        3 N V 4  fp32 logits, their softmax and log-softmax for one step
  training (the backward) and grad sync (its end)
    gradients             4P/S     fp32 shards (freed by the optimizer step)
    root gradients        2R       the root's unsharded bf16 gradients (embedding, LM head), held from
                                   the LM head's backward to the root's reduce-scatter at the very end
  training
    gathered units        2 (R + max(V + Y, 2Y))  the root stays gathered through forward and backward,
                                   with the vision tower and a decoder layer, or two layers (prefetch)
    reduce-scatter buffer 4 max(V, Y)  FSDP2 copies a unit's gradients into an fp32 buffer to reduce-
                                   scatter them (reduce_dtype fp32): the vision tower's or a layer's
    activations           (estimate, activation checkpointing on) for T = m (p + G c) positions of a
                                   micro-batch of m questions: each layer's input T H 2 L, the prompt's K/V
                                   kept once and repeated for the G rows (m + m G) p L 2 k d 2, one layer
                                   recomputed with its gradients 2 T (2H + 2H_a + 3I) 2 (H_a = heads x
                                   head_dim: H, but 4096 against 2560 at Qwen3-VL-4B), an LM-head chunk
                                   3 C V 4 (C = --logprob_chunk), the vision tower's inputs per block 2 v E B;
                                   without checkpointing every layer's intermediates are kept: x L
  grad sync
    root reduce-scatter   4R       the root's gradients in fp32 beside their bf16 copy, the activations
                                   and gathered units already freed

LoRA (--lora_rank r, sbr/lora.py): each target nn.Linear (in -> out) gets A (r x in) and B (out x r),
trained in fp32, the base frozen. A = r sum(in + out) adapter parameters (sbr.lora.targets on the meta
model), of which A_R in the root, A_Y in a layer and A_V in the tower (0 unless --lora_vision):
    base parameters       2P/S     bf16 shards, frozen: no fp32 master, no gradients, no AdamW state
    adapters              4A/S     fp32 master shards;  AdamW state 8A/S;  gradients 4A/S
    reference             none     the base model is the policy with its adapters off (sbr.lora.Base)
    rollout weights       2P + 2A  and decoding weights 2(P - V) + 2(A - A_V): every unit with its adapters
    all-gather copy       2(Y + A_Y);  gathered units 2 (R + A_R + max(V + A_V + Y + A_Y, 2(Y + A_Y)))
    reduce-scatter buffer 4 max(A_V, A_Y);  root gradients 2 A_R and root reduce-scatter 4 A_R: 0 (and
                                   not listed) when the root (embedding, LM head) has no target
    activations           as above: the backward still runs through every layer

Offload (--offload, FSDP2's CPUOffloadPolicy, pinned host memory) moves lines to a host section, per
process and per node (min(world, 8) processes, one a GPU):
    params                the sharded parameters (fp32 master or adapters, the frozen base's and the
                          reference's shards), their gradients and the AdamW state; the optimizer steps
                          on the CPU. The GPU keeps what is gathered (rollout weights, gathered units,
                          all-gather copy, reduce-scatter buffer), the activations and the KV cache
    optimizer             the AdamW state only (sbr/offload.py): the step streams it through the GPU,
                          3 x 64 MB at a time once the gradients are reduced, below every phase

Peak = the largest phase. Each phase sums what can be alive at its worst moment, so it errs high
(the training phase counts the activations and the vision tower's reduce-scatter together, though
the tower's backward comes last). CUDA's allocator runs with expandable segments (sbr.common
.allocator_defaults), so freed blocks are reusable whatever their size and the plan's sums apply.
"""
import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from sbr.common import ConfigError
from sbr.family import of_config
from sbr.lora import TARGETS, targets
from sbr.published import config_source, load_config

GIB = 2**30
FIXED = 2 * GIB
NODE_GPUS = 8       # GPUs a node, at most: a plan's host memory per node is min(world, 8) processes'


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
    adapter_total: int = 0    # sum(in + out) over the LoRA targets: A = r x this
    adapter_root: int = 0     # ... of the targets in the root (A_R / r)
    adapter_layer: int = 0    # ... in the largest decoder layer (A_Y / r)
    adapter_vision: int = 0   # ... in the vision tower (A_V / r; 0 without --lora_vision)
    frame_multiple: int = 28  # pixels a merged token covers (patch x merge; sbr/family.py)
    default_frame: int = 252  # the family's frame side for --frame_size 0
    pair_text: int = 0        # text tokens a frame pair adds (Qwen3-VL's "<t seconds>" and its start/end: ~8)
    attn_width: int = 0       # H_a = heads x head_dim (0: = H; Qwen3-VL-4B: 32 x 128 = 4096 against H = 2560)


def model_sizes(config, lora_targets=TARGETS, lora_vision: bool = False) -> Sizes:
    """Count a Qwen2-VL / Qwen2.5-VL / Qwen3-VL configuration's parameters on the meta device, and the LoRA
    targets' sum(in + out) by unit (sbr.lora.targets; all 0 when no nn.Linear has those names)."""
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = lambda module: sum(p.numel() for p in module.parameters())   # noqa: E731
    text, vision = config.text_config, config.vision_config
    family = of_config(config)
    layers, tower = model.model.language_model.layers, model.model.visual
    total, layer = count(model), count(layers[0])
    try:
        found = [m for _, m in targets(model, lora_targets, lora_vision)]
    except ValueError:
        found = []
    io = lambda ms: sum(m.in_features + m.out_features for m in ms)      # noqa: E731
    in_tower = {id(m) for m in tower.modules()}
    per_layer = [io(m for m in found if any(m is x for x in block.modules())) for block in layers]
    in_vision = io(m for m in found if id(m) in in_tower)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Sizes(total=total, root=total - text.num_hidden_layers * layer - count(tower), layer=layer,
                 vision=count(tower), layers=text.num_hidden_layers, hidden=text.hidden_size,
                 intermediate=text.intermediate_size, kv_heads=text.num_key_value_heads, head_dim=head_dim,
                 vocab=text.vocab_size, frame_multiple=family.multiple, default_frame=family.frame_size,
                 pair_text=PAIR_TEXT_TOKENS if family.video_time == "timestamps" else 0,
                 attn_width=text.num_attention_heads * head_dim,
                 vision_width=getattr(vision, "embed_dim", None) or vision.hidden_size, vision_blocks=vision.depth,
                 adapter_total=io(found), adapter_layer=max(per_layer), adapter_vision=in_vision,
                 adapter_root=io(found) - sum(per_layer) - in_vision)


TEXT_TOKENS = 171   # the template, question and options of a SEED-Bench-R1 prompt: 900 tokens in all at 16 frames of 252 px


PAIR_TEXT_TOKENS = 8  # Qwen3-VL, a frame pair: "<t seconds>" (~6 tokens) and its own start/end tokens (assumed)


def frame_side(cfg, s: Sizes) -> int:
    """The frame side a run uses: --frame_size, or the family's for 0."""
    return cfg.frame_size or s.default_frame


def prompt_tokens(frame_size: int, max_frames: int, text: int = TEXT_TOKENS, multiple: int = 28,
                  pair_text: int = 0) -> tuple[int, int]:
    """(visual tokens, prompt tokens): max_frames frames in groups of 2 and the observation image, each
    (frame_size / multiple)^2 merged tokens, and `text` tokens of text (assumed, not read from data),
    plus `pair_text` a frame pair (Qwen3-VL's timestamps)."""
    per_frame = (frame_size // multiple) ** 2
    visual = (max_frames // 2) * per_frame + per_frame
    return visual, visual + text + (max_frames // 2) * pair_text


@dataclass
class Plan:
    lines: list = field(default_factory=list)       # (phases, name, bytes, how): "all", or names joined by "+"
    host: list = field(default_factory=list)        # the same, for the lines --offload moved to pinned host memory
    offload: str = "none"
    node: int = 1                                   # processes a node: min(world, 8)

    def add(self, phases: str, name: str, nbytes: float, how: str, host: bool = False) -> None:
        (self.host if host else self.lines).append((phases, name, int(nbytes), how))

    def phases(self) -> list[str]:
        return list(dict.fromkeys(p for ps, *_ in self.lines if ps != "all" for p in ps.split("+")))

    def total(self, phase: str) -> int:
        return sum(b for ps, _, b, _ in self.lines if ps == "all" or phase in ps.split("+"))

    def peak(self) -> tuple[str, int]:
        return max(((p, self.total(p)) for p in self.phases()), key=lambda x: x[1])

    def host_total(self) -> int:
        """Pinned host memory a process: every host line at once (gradients included, the step's worst)."""
        return sum(b for _, _, b, _ in self.host)

    def render(self, gpu_bytes: int, title: str, advice: list[str], notes: list[str] = ()) -> str:
        """The table and its verdict; `advice` (lines from sbr.memory.advice) is shown when it does not fit;
        then the host section, when --offload moved lines there."""
        out = [f"memory plan, {title}, per GPU (GiB):"] + [f"  {note}" for note in notes]
        for phases, name, nbytes, how in self.lines:
            out.append(f"  {phases:19s} {name:21s} {nbytes / GIB:6.2f}   {how}")
        for phase in self.phases():
            out.append(f"  {phase:19s} {'total':21s} {self.total(phase) / GIB:6.2f}")
        phase, peak = self.peak()
        verdict = "fits" if peak <= gpu_bytes else "DOES NOT FIT"
        out.append(f"  peak: {peak / GIB:.2f} GiB in the {phase} phase, of {gpu_bytes / GIB:.1f} GiB: {verdict} "
                   f"({(gpu_bytes - peak) / GIB:+.2f} GiB)")
        if peak > gpu_bytes and advice:
            out += ["  WARNING: this run will run out of GPU memory. Each of these changes, alone, lowers the peak to:"]
            out += [f"    {a}" for a in advice]
        elif peak > gpu_bytes:
            out.append(f"  WARNING: this run will run out of GPU memory, and no flag of sbr lowers its peak: it needs "
                       f"GPUs with at least {peak / GIB:.1f} GiB")
        if self.host:
            out.append(f"host memory (pinned, --offload {self.offload}), per process (GiB):")
            out += [f"  {phases:19s} {name:21s} {nbytes / GIB:6.2f}   {how}" for phases, name, nbytes, how in self.host]
            out.append(f"  {'a process':19s} {'total':21s} {self.host_total() / GIB:6.2f}")
            out.append(f"  {'a node':19s} {'total':21s} {self.node * self.host_total() / GIB:6.2f}   "
                       f"{self.node} process{'es' if self.node > 1 else ''} (one a GPU, min(world, {NODE_GPUS}) a node)")
        return "\n".join(out)


def _adapters(s: Sizes, r: int) -> tuple[int, int, int, int]:
    """(A, A_R, A_Y, A_V): LoRA's adapter parameters at rank r, in all, the root, a layer, the tower (0 at r = 0)."""
    return r * s.adapter_total, r * s.adapter_root, r * s.adapter_layer, r * s.adapter_vision


def _trained(s: Sizes, r: int) -> tuple[int, int, int, int]:
    """The same four counts for what is trained: every parameter (P, R, Y, V), or LoRA's adapters."""
    return _adapters(s, r) if r else (s.total, s.root, s.layer, s.vision)


def _shared(plan: Plan, s: Sizes, S: int, r: int, offload: str) -> None:
    """The sharded lines every phase holds: on the GPU, or the host (--offload)."""
    T = _trained(s, r)[0]
    if r:
        plan.add("all", "base parameters", 2 * s.total / S, f"bf16 shards, frozen: 2 x {s.total:,} / {S}",
                 host=offload == "params")
        plan.add("all", "adapters", 4 * T / S, f"fp32 shards: 4 x {T:,} / {S} (LoRA r = {r})", host=offload == "params")
    else:
        plan.add("all", "policy parameters", 4 * T / S, f"fp32 shards: 4 x {T:,} / {S}", host=offload == "params")
    plan.add("all", "AdamW state", 8 * T / S, "exp_avg + exp_avg_sq, fp32 shards", host=offload != "none")


def _training(plan: Plan, s: Sizes, S: int, r: int, offload: str, activations: float, how: str) -> None:
    """The backward ("training") and its end ("grad sync"), GRPO's and SFT's alike. The root's lines are
    left out when it trains nothing (LoRA's embedding and LM head are frozen)."""
    T, T_R, T_Y, T_V = _trained(s, r)
    _, A_R, A_Y, A_V = _adapters(s, r)
    plan.add("training+grad sync", "gradients", 4 * T / S, "fp32 shards", host=offload == "params")
    if T_R:
        plan.add("training+grad sync", "root gradients", 2 * T_R, "bf16, unsharded until the root's reduce-scatter")
    unit = s.layer + A_Y                                                     # a layer and its adapters
    plan.add("training", "gathered units", 2 * (s.root + A_R + max(s.vision + A_V + unit, 2 * unit)),
             "bf16: root + vision + a layer (or two layers)" + (", with their adapters" if r else ""))
    plan.add("training", "reduce-scatter buffer", 4 * max(T_V, T_Y),
             "fp32: a layer's adapter gradients" if r else "fp32: the vision tower's (or a layer's)")
    plan.add("training", "activations", activations, how)
    if T_R:
        plan.add("grad sync", "root reduce-scatter", 4 * T_R, "fp32 copy of the root's gradients")


def _activations(s: Sizes, T: int, prompt_kv_rows: int, p: int, checkpointing: bool, chunk: int,
                 vision_tokens: int, entropy_grad: bool = False) -> float:
    kv = 2 * s.kv_heads * s.head_dim * 2                                     # K and V, bf16, per token per layer
    saved = T * s.hidden * 2 * s.layers + prompt_kv_rows * p * s.layers * kv + 2 * vision_tokens * s.vision_width * s.vision_blocks
    layer = 2 * T * (2 * s.hidden + 2 * (s.attn_width or s.hidden) + 3 * s.intermediate) * 2
    head = (3 + entropy_grad) * chunk * s.vocab * 4            # an entropy bonus keeps the chunk's softmax too
    return saved + (layer if checkpointing else layer * s.layers) + head


def grpo_plan(s: Sizes, *, shard: int, G: int, questions: int, micro_questions: int, prompt: int, visual: int,
              completion: int, beta: float, checkpointing: bool, chunk: int, reference: str | None = None,
              entropy_grad: bool = False, lora_rank: int = 0, offload: str = "none") -> Plan:
    """reference: "frozen" (bf16 shards), "ema" (GRPO-CARE's, fp32 shards), "none"; None: frozen when
    beta > 0, else none; with LoRA always none (the base is the policy with its adapters off). entropy_grad:
    an entropy bonus (--entropy_coef) backpropagates through the LM-head chunk's entropy, one more
    (chunk, V) fp32 buffer. lora_rank: 0 = full fine-tuning; offload: "none", "params" or "optimizer"."""
    plan = Plan(offload=offload)
    _shared(plan, s, shard, lora_rank, offload)
    reference = "none" if lora_rank else reference or ("frozen" if beta else "none")
    if reference == "ema":     # built like the policy (train_grpo.py), so offloaded with it
        plan.add("all", "reference", 4 * s.total / shard, "fp32 shards, an EMA of the policy (GRPO-CARE)",
                 host=offload == "params")
    elif reference == "frozen":
        plan.add("all", "reference", 2 * s.total / shard, "bf16 shards, frozen", host=offload == "params")
    plan.add("all", "CUDA context, NCCL", FIXED, "fixed allowance")
    N = questions * G
    kv = 2 * s.kv_heads * s.head_dim * 2
    A, _, A_Y, A_V = _adapters(s, lora_rank)
    plan.add("prefill", "rollout weights", 2 * (s.total + A),
             "all units gathered in bf16 for the rollout" + (", with their adapters" if A else ""))
    plan.add("prefill", "all-gather copy", 2 * (s.layer + A_Y),
             "the last layer's all-gather buffer beside its parameters")
    plan.add("prefill", "prompt K/V", questions * prompt * s.layers * kv, f"{questions} x {prompt} tokens")
    plan.add("decoding", "decoding weights", 2 * (s.total - s.vision + A - A_V),
             "the vision tower resharded after the prefill")
    plan.add("decoding", "rollout KV cache", (questions * prompt + N * completion) * s.layers * kv,
             f"({questions} x {prompt} prompt + {N} x {completion} tokens) x {s.layers} layers x {kv} B")
    plan.add("decoding", "rollout logits", 3 * N * s.vocab * 4, "fp32 logits, softmax, log-softmax of a step")
    m = micro_questions
    T = m * (prompt + G * completion)
    _training(plan, s, shard, lora_rank, offload,
              _activations(s, T, m + m * G, prompt, checkpointing, chunk, m * visual * 4, entropy_grad),
              f"estimate: {T} positions a micro-batch, checkpointing {'on' if checkpointing else 'off'}")
    return plan


def sft_plan(s: Sizes, *, shard: int, micro_batch: int, max_length: int, visual: int, checkpointing: bool,
             chunk: int, lora_rank: int = 0, offload: str = "none") -> Plan:
    plan = Plan(offload=offload)
    _shared(plan, s, shard, lora_rank, offload)
    plan.add("all", "CUDA context, NCCL", FIXED, "fixed allowance")
    T = micro_batch * max_length
    _training(plan, s, shard, lora_rank, offload,
              _activations(s, T, 0, 0, checkpointing, chunk, micro_batch * visual * 4),
              f"estimate: {T} positions (micro-batch x max_length, the worst case)")
    return plan


def device_bytes(default_gib: float) -> tuple[int, str]:
    """This machine's GPU memory, or `default_gib` for planning on a machine without one."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, props.name
    return int(default_gib * GIB), f"{default_gib:g} GiB (planned; no GPU here)"


def _beta(cfg) -> bool:
    return bool(cfg.beta)


def _with(cfg, fields: dict):
    """`cfg` with `fields` changed (a dataclass, or any object with a __dict__)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.replace(cfg, **fields)
    return SimpleNamespace(**{**vars(cfg), **fields})


def _plan(s: Sizes, cfg, world: int, kind: str, needs_reference=None) -> Plan:
    """The plan of a script's Config `cfg` (its fields read by name; lora_rank and offload optional) on
    `world` GPUs."""
    visual, prompt = prompt_tokens(frame_side(cfg, s), cfg.max_frames, multiple=s.frame_multiple, pair_text=s.pair_text)
    shard = cfg.shard_group_size or world
    adapt = dict(lora_rank=getattr(cfg, "lora_rank", 0), offload=getattr(cfg, "offload", "none"))
    if kind == "sft":
        plan = sft_plan(s, shard=shard, micro_batch=cfg.micro_batch_size, max_length=cfg.max_length, visual=visual,
                        checkpointing=cfg.activation_checkpointing, chunk=cfg.logprob_chunk, **adapt)
    else:
        plan = grpo_plan(s, shard=shard, G=cfg.num_generations, questions=cfg.questions_per_rank,
                         micro_questions=min(cfg.micro_batch_questions, cfg.questions_per_rank), prompt=prompt,
                         visual=visual, completion=cfg.max_completion_length, beta=cfg.beta,
                         checkpointing=cfg.activation_checkpointing, chunk=cfg.logprob_chunk,
                         reference=cfg.reference if (needs_reference or _beta)(cfg) else "none",
                         entropy_grad=bool(getattr(cfg, "entropy_coef", 0)), **adapt)
    plan.node = min(world, NODE_GPUS)
    return plan


def _offload_modes() -> tuple[str, ...]:
    """The --offload modes the trainers accept (sbr.training.OFFLOAD), so the advice names only flags that
    run; imported here, not at the top, as sbr.training loads the model code."""
    from sbr.training import OFFLOAD
    return OFFLOAD


def _changes(cfg, world: int, kind: str, s: Sizes) -> list[tuple[str, dict, str]]:
    """(flag, fields it sets, what it costs) for each flag that exists and differs from `cfg`'s setting."""
    out = []
    def smaller(name, value, least, cost):                                   # noqa: E306
        if least <= value < getattr(cfg, name):
            out.append((f"--{name} {value}", {name: value}, cost))
    if kind == "grpo":
        smaller("questions_per_rank", 1, 1, "fewer questions a GPU a step: more steps or GPUs for the same batch")
        smaller("micro_batch_questions", 1, 1, "more gradient accumulation, the same update")
        smaller("max_completion_length", cfg.max_completion_length // 2, 1, "longer completions are cut")
        if cfg.beta:
            out.append(("--beta 0", {"beta": 0.0}, "no KL term: changes the objective"))
    else:
        smaller("micro_batch_size", 1, 1, "more gradient accumulation, the same update")
        smaller("max_length", cfg.max_length // 2, 1, "longer examples are cut")
    if not cfg.activation_checkpointing:
        out.append(("--activation_checkpointing true", {"activation_checkpointing": True},
                    "each layer recomputed in the backward: slower"))
    smaller("logprob_chunk", cfg.logprob_chunk // 2, 1, "more, smaller LM-head chunks: slower")
    side, m = frame_side(cfg, s), s.frame_multiple
    if m <= side // 2 // m * m < side:
        out.append((f"--frame_size {side // 2 // m * m}", {"frame_size": side // 2 // m * m},
                    "fewer visual tokens a frame: changes the inputs"))
    smaller("max_frames", cfg.max_frames // 2, 2, "fewer frames: changes the inputs")
    if 0 < cfg.shard_group_size < world:
        out.append(("--shard_group_size 0", {"shard_group_size": 0}, "FSDP over all GPUs instead of HSDP"))
    if getattr(cfg, "lora_rank", None) == 0:
        out.append(("--lora_rank 64", {"lora_rank": 64}, "LoRA: the base frozen, only adapters trained (sbr/lora.py)"))
    if getattr(cfg, "offload", None) == "none" and getattr(cfg, "load", "sharded") == "sharded":
        for mode, cost in (("params", "shards, gradients and AdamW state in host memory, the optimizer step on the "
                                      "CPU: slower"), ("optimizer", "the AdamW state in host memory, through the GPU and back each step (PCIe): slower")):
            if mode in _offload_modes():
                out.append((f"--offload {mode}", {"offload": mode}, cost))
    return out


def advice(s: Sizes, cfg, world: int, gpu_bytes: int, kind: str, needs_reference=None) -> list[str]:
    """Each change of one flag that lowers the planned peak, tried by planning it: its new peak and whether
    it then fits, lowest first. More GPUs: the fewest (world x 2, x 4, ...) that fit, else twice as many.
    When none fits alone, the best two (of different flags) together, after them. An empty list: no flag helps."""
    plan = lambda c, n=world: _plan(s, c, n, kind, needs_reference)          # noqa: E731
    now = plan(cfg)
    peak = now.peak()[1]
    tried = []                                  # (peak, flag, cost, fields, world, plan)
    for flag, fields, cost in _changes(cfg, world, kind, s):
        if fields.get("lora_rank") and not s.adapter_total:
            continue                            # --lora_targets names no nn.Linear: LoRA would not start
        p = plan(_with(cfg, fields))
        tried.append((p.peak()[1], flag, cost, fields, world, p))
    worlds = [world * 2**k for k in range(1, 11)]
    more = [plan(cfg, n) for n in worlds]
    n, p = next(((n, p) for n, p in zip(worlds, more) if p.peak()[1] <= gpu_bytes), (worlds[0], more[0]))
    kept = ", the rollout's gathered weights (2P) do not" if kind == "grpo" else ""
    tried.append((p.peak()[1], f"--plan_world_size {n}", f"{n} GPUs instead of {world}: the sharded lines shrink{kept}",
                  {}, n, p))
    helps = sorted((t for t in tried if t[0] < peak), key=lambda t: t[:2])
    lines = [_advised(t, gpu_bytes, now) for t in helps]
    if helps and helps[0][0] > gpu_bytes:       # none fits alone: the best two of different flags together
        a = helps[0]
        b = next((t for t in helps[1:] if not t[3].keys() & a[3].keys()), None)
        if b:
            p = plan(_with(cfg, {**a[3], **b[3]}), max(a[4], b[4]))
            lines.append(_advised((p.peak()[1], f"{a[1]} {b[1]}", "no single change fits: the best two together",
                                   None, None, p), gpu_bytes, now))
    return lines


def _advised(t: tuple, gpu_bytes: int, now: Plan) -> str:
    """One advice line: the change, its peak and verdict, what it costs (and the host memory it needs)."""
    p, flag, cost, *_, plan = t
    verdict = "fits" if p <= gpu_bytes else "still does not fit"
    host = (f"; pinned host memory {plan.node * plan.host_total() / GIB:.1f} GiB a node"
            if plan.host_total() != now.host_total() else "")
    return f"{flag}: peak {p / GIB:.2f} GiB, {verdict} ({(gpu_bytes - p) / GIB:+.2f} GiB); {cost}{host}"


def plan_for(cfg, world: int, kind: str, needs_reference=None) -> str:
    """The plan train_grpo.py (kind "grpo") and train_sft.py ("sft") print, from their Config's fields read
    by name; `needs_reference(cfg) -> bool` is the script's rule for building π_ref (GRPO; None: beta > 0),
    applied to each change the advice tries. Only the model's configuration is read (sbr/published.py):
    no weights, no data, no network for a folder or a published hub id."""
    r, names = getattr(cfg, "lora_rank", 0), getattr(cfg, "lora_targets", TARGETS)
    s = model_sizes(load_config(cfg.model, cfg.trust_remote_code), names, getattr(cfg, "lora_vision", False))
    if r and not s.adapter_total:
        raise ConfigError(f"--lora_targets {' '.join(names)}: no nn.Linear of {cfg.model} has these names")
    gpu, name = device_bytes(cfg.gpu_memory_gib or 40)
    side = frame_side(cfg, s)
    visual, prompt = prompt_tokens(side, cfg.max_frames, multiple=s.frame_multiple, pair_text=s.pair_text)
    origin = {"folder": "its config.json", "published": "sbr's copy of its published config.json",
              "hub": "its config from the Hugging Face cache"}[config_source(cfg.model)]
    pixels = f"{cfg.max_frames // 2} frame pairs + the image, {(side // s.frame_multiple) ** 2} each at {side} px"
    if kind == "grpo":
        stamps = (f" + {cfg.max_frames // 2 * s.pair_text} of timestamps ({s.pair_text} a frame pair, assumed)"
                  if s.pair_text else "")
        tokens = (f"prompt: {prompt} tokens = {visual} visual ({pixels}) + {TEXT_TOKENS} text (assumed: the paper's "
                  f"prompt){stamps}")
    else:
        tokens = f"sequence: {cfg.max_length} tokens (--max_length, the worst case), {visual} of them visual ({pixels})"
    notes = [f"model: {cfg.model} ({origin}), {s.total:,} parameters", tokens + "; no data read"]
    if r:
        notes.append(f"LoRA r = {r} on {' '.join(names)}: {r * s.adapter_total:,} adapter parameters trained, the base "
                     f"frozen" + ("; π_ref is the base (adapters off), no reference copy" if kind == "grpo" else ""))
    plan = _plan(s, cfg, world, kind, needs_reference)
    tips = advice(s, cfg, world, gpu, kind, needs_reference) if plan.peak()[1] > gpu else []
    return plan.render(gpu, f"{kind.upper()} on {world} x {name}", tips, notes)


FIT_MODELS = ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct")
FIT_GPUS = ((1, 24), (1, 80), (2, 80), (4, 80), (8, 40))      # (GPUs, GiB each)


def fit_table(cfg, needs_reference=None, rank: int = 64) -> str:
    """The README's "What fits where": GRPO's peak per GPU at `cfg`'s settings (train_grpo.Config()) for
    each model of FIT_MODELS, full fine-tuning and LoRA r = `rank`, on each machine of FIT_GPUS, from the
    plan the dry run prints; and full fine-tuning with --offload optimizer or params where that changes a verdict."""
    head = "| model | training | " + " | ".join(f"{n} x {gib} GB" for n, gib in FIT_GPUS) + " |"
    rows = [head, "|" + " --- |" * (2 + len(FIT_GPUS))]
    for model in FIT_MODELS:
        s = model_sizes(load_config(model), getattr(cfg, "lora_targets", TARGETS), getattr(cfg, "lora_vision", False))
        runs = {how: [_plan(s, _with(cfg, {"model": model, **fields}), n, "grpo", needs_reference) for n, _ in FIT_GPUS]
                for how, fields in (("full", {"lora_rank": 0, "offload": "none"}),
                                    (f"LoRA r = {rank}", {"lora_rank": rank, "offload": "none"}),
                                    ("full, `--offload optimizer`", {"lora_rank": 0, "offload": "optimizer"}),
                                    ("full, `--offload params`", {"lora_rank": 0, "offload": "params"}))}
        fits = {how: [p.peak()[1] <= gib * GIB for p, (_, gib) in zip(plans, FIT_GPUS)] for how, plans in runs.items()}
        for how, plans in runs.items():
            if how.endswith("`") and fits[how] == fits["full"]:
                continue
            hosts = sorted({f"{p.node * p.host_total() / GIB:.0f}" for p in plans if p.host}, key=float)
            label = how + (f" (pinned host memory: {' to '.join(hosts)} GiB a node)" if hosts else "")
            cells = [f"{p.peak()[1] / GIB:.2f} GiB, {'fits' if ok else 'does not fit'}"
                     for p, ok in zip(plans, fits[how])]
            rows.append(f"| {model.split('/')[1]} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def decode_step_bytes(s: Sizes, *, questions: int, prompt: int, G: int, completion: int, dtype_bytes: int = 2) -> dict:
    """What one decoding step must read, averaged over a `completion`-token rollout: the language
    model's weights once (decoder layers, final norm, LM head; of the embedding only N rows, left out),
    each question's prompt K/V once (shared by its G rows, sbr/decode.py), each row's own K/V (t + 1
    tokens at step t, (c + 1) / 2 on average). Over a device's read bandwidth this is the step's floor.
    Qwen2-VL-7B, 1 question x G = 8, 900 + 256 tokens, bf16: 14.14 GB + 51.6 MB + 59.0 MB."""
    kv = s.layers * 2 * s.kv_heads * s.head_dim * dtype_bytes                  # bytes a token, all layers
    return {"weights": (s.layers * s.layer + s.vocab * s.hidden + s.hidden) * dtype_bytes,
            "prompt_kv": questions * prompt * kv, "own_kv": questions * G * (completion + 1) / 2 * kv}
