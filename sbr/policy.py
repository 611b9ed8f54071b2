"""The forwards GRPO needs, around a Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL model.

`Policy` is an nn.Module holding the HF model as `.model`; its methods `prefill`, `decode` and
`logprobs` are registered as FSDP2 forward methods (sbr/fsdp.py), so calling them gathers the root's
parameters (embeddings, final norm, LM head) the way `forward` would.

Shapes: B questions, G completions a question (rows ordered q0g0..q0g{G-1}, q1g0, ...), P padded
prompt length, C completion length, V vocabulary, H hidden size.

Vision: every forward makes exactly one call to the vision tower, videos and images of the batch
together (each grid attends only within itself, so this equals separate calls); Qwen3-VL's DeepStack
features (from vision layers 8, 16, 24 at 8B) travel with the tower's output to the decoder, which adds
them to its first layers' hidden states at the visual positions of the prompt (decoding sees none). With FSDP2 every
rank must make the same collective calls: a rank whose batch has no media still runs the tower on
one dummy 2x2 patch whose output enters the graph with weight 0.

Shared prompt (the default of `logprobs`): each prompt runs once, vision tower included, its per-layer
K/V recorded in the autograd graph (`_RecordLayer`), repeated for its G rows (`_PrefixLayer`), and the
B*G completions run against them with mRoPE positions L_b + t + delta_b continuing the prompt's; the
G completions' gradients sum into the one prompt computation. Both caches give the same result when
activation checkpointing replays a layer.

Decoding (sbr/decode.py) keeps each prompt's K/V once for its G rows and each row's new K/V apart, and
runs its own step over the model's modules: eager, or compiled with static shapes (`compile_decode`;
CUDA graphs on a GPU, recorded and freed by sbr/graphs.py).

Log-probs: the LM head and log-softmax run only at completion positions, in chunks of `chunk_size`
tokens, each chunk checkpointed, so no (tokens x vocab) fp32 tensor of the whole batch is ever held:
    log π(o_t) = z_t[o_t] - logsumexp(z_t),   z_t = h_t W^T / temperature
"""
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures as DeepstackOutput

from sbr.decode import GroupCache, decode_step, logits_fp32, matmul_fp32
from sbr.fsdp import release
from sbr.graphs import static_step


class _Logits(torch.autograd.Function):
    """z = h W^T in fp32 (sbr.decode.matmul_fp32: the rollout's logits are computed the same way, so
    sampling and training see one distribution); the backward is the plain bf16 matmul's (grad_h =
    g W, grad_W = g^T h, in the operands' dtype), saving only h and W."""
    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return matmul_fp32(hidden, weight.t())

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        grad = grad.to(hidden.dtype)
        return grad @ weight, grad.t() @ hidden


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                    suppress: torch.Tensor, entropy_grad: bool = False):
    """hidden (n, H), weight (V, H), targets (n,) -> log-probs (n,), entropy (n,) (detached unless
    `entropy_grad`: an entropy bonus needs its gradient).
    Suppressed ids get the lowest float (exp gives exactly 0, as -inf does when sampling), so both see
    the same distribution. In-place steps keep it at about two (n, V) fp32 buffers."""
    z = _Logits.apply(hidden, weight)                                      # (n, V) fp32
    if temperature != 1.0:
        z.div_(temperature)
    if suppress.numel():
        z.index_fill_(-1, suppress, torch.finfo(z.dtype).min)
    lse = torch.logsumexp(z, dim=-1)                                       # (n,)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse                # (n,)
    if entropy_grad:
        return logp, lse - (torch.softmax(z, dim=-1) * z).sum(-1)          # (n,) -Σ p log p = lse - Σ p z
    with torch.no_grad():
        p = torch.softmax(z, dim=-1)                                       # (n, V)
        entropy = lse - p.mul_(z).sum(-1)                                  # (n,) -Σ p log p = lse - Σ p z
    return logp, entropy


class Policy(nn.Module):
    def __init__(self, model: nn.Module, *, suppress_token_ids: list[int] = (), chunk_size: int = 256,
                 compile_decode: bool = False):
        super().__init__()
        self.model = model
        self.suppress_token_ids = list(suppress_token_ids)   # never sampled (sbr.model.visual_token_ids)
        self.chunk_size = chunk_size
        self.compile_decode = compile_decode
        self._step = None                # the compiled step (sbr.graphs.static_step), made at first use
        self._decode_pool = {}           # compiled decoding's cache buffers, kept across rollouts
        # our prompt caches are replay-safe (_RecordLayer, _PrefixLayer): let HF's activation
        # checkpointing keep them instead of dropping the cache
        for layer in self.inner.language_model.layers:
            layer._can_checkpoint_with_cache = True

    @property
    def inner(self):
        return self.model.model          # Qwen2VLModel / Qwen2_5_VLModel: .visual, .language_model

    # ------------------------------------------------------------------ positions
    def rope_index(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen's mRoPE positions (3, B, P) of a left-padded prompt batch, and deltas (B, 1) such that
        the text token at unpadded index j sits at j + delta on all three axes."""
        kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
        return self.inner.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                         attention_mask=inputs["attention_mask"], **kwargs)

    # ------------------------------------------------------------------ vision
    def visual_features(self, inputs: dict, repeats: int = 1, share: bool = True) -> tuple[dict, torch.Tensor]:
        """Encoder outputs for `mm_encoder_outputs`, each question's features repeated `repeats` times
        (share=True: the tower sees each question once; share=False: its pixels are repeated, as a
        peer's repeated forward would do). Also returns a zero-valued scalar tied to the tower's output,
        to add to the result so every rank's backward reaches the tower."""
        kinds, pixels, grids = [], [], []
        for kind, pkey, gkey in (("video", "pixel_values_videos", "video_grid_thw"), ("image", "pixel_values", "image_grid_thw")):
            if gkey not in inputs:
                continue
            sizes = inputs[gkey].prod(-1).tolist()
            for chunk, grid in zip(torch.split(inputs[pkey], sizes), inputs[gkey]):
                copies = 1 if share else repeats
                kinds += [kind] * copies
                pixels += [chunk] * copies
                grids += [grid] * copies
        visual = self.inner.visual
        dtype = next(visual.parameters()).dtype
        if not pixels:                                  # keep the collectives of every rank in step
            patch = visual.config.in_channels * visual.config.temporal_patch_size * visual.config.patch_size ** 2
            dummy = visual(torch.zeros(4, patch, dtype=dtype, device=inputs["input_ids"].device),
                           grid_thw=torch.tensor([[1, 2, 2]], device=inputs["input_ids"].device))
            return {}, sum(t.sum() for t in (dummy.pooler_output, *_deepstack(dummy))) * 0.0
        result = visual(torch.cat(pixels).to(dtype), grid_thw=torch.stack(grids))
        out, deep = result.pooler_output, _deepstack(result)                  # (tokens, H); per DeepStack layer
        merge = visual.spatial_merge_size ** 2
        sizes = [int(g.prod()) // merge for g in grids]
        feats = [torch.split(t, sizes) for t in (out, *deep)]                 # [tensor][item]
        by_kind = {"video": [], "image": []}                                  # the items of each kind, repeated
        for i, kind in enumerate(kinds):
            by_kind[kind] += [i] * (repeats if share else 1)
        encoded = {}
        for kind, items in by_kind.items():
            if items:
                main, *stack = [tuple(f[i] for i in items) for f in feats]
                encoded[kind] = (DeepstackOutput(pooler_output=main, deepstack_features=stack) if deep else
                                 BaseModelOutputWithPooling(pooler_output=main))
        return encoded, sum(t.sum() for t in (out, *deep)) * 0.0

    # ------------------------------------------------------------------ generation
    def prefill(self, inputs: dict):
        """Run the prompts once. Returns logits of the next token (B, V) fp32, the KV cache, the
        prompts' unpadded lengths (B,) and rope deltas (B, 1)."""
        position_ids, deltas = self.rope_index(inputs)
        encoded, zero = self.visual_features(inputs)
        release(self.inner.visual)               # under sbr.fsdp.gathered: decoding never reads the tower
        out = self.inner(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         position_ids=position_ids, mm_encoder_outputs=encoded, use_cache=True)
        logits = logits_fp32(out.last_hidden_state[:, -1], self.model.lm_head)   # (B, V) fp32, as decoding's
        return logits + zero, out.cache, inputs["attention_mask"].sum(1), deltas

    def group_cache(self, prefill_cache, attention_mask: torch.Tensor, group_size: int, new_tokens: int) -> GroupCache:
        """The decoding cache after `prefill`: each prompt's K/V once, room for `new_tokens` a row."""
        weight = self.inner.language_model.layers[0].self_attn.q_proj.weight
        if isinstance(weight, DTensor):
            raise RuntimeError("decoding a sharded model: run it inside sbr.fsdp.gathered(policy)")
        if not self.compile_decode:
            return GroupCache(prefill_cache, attention_mask, group_size, new_tokens)
        return GroupCache(prefill_cache, attention_mask, group_size, new_tokens, bucket=64, pool=self._decode_pool)

    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, t: int, cache: GroupCache) -> torch.Tensor:
        """One step for N = B*G rows: token_ids (N,), their positions (N,), t their index among the new
        tokens -> next-token logits (N, V) fp32."""
        if not self.compile_decode:
            return decode_step(self.model, cache, token_ids, positions, t)
        if self._step is None:
            self._step = static_step(token_ids.device)
        return self._step(self.model, cache, token_ids, positions, cache.slots[t])

    @property
    def decode_recordings(self) -> int:
        """CUDA graphs the compiled decoding step has recorded so far (0 without them: sbr/graphs.py)."""
        return getattr(self._step, "recordings", 0)

    # ------------------------------------------------------------------ training
    def logprobs(self, inputs: dict, completion_ids: torch.Tensor, group_size: int, *, temperature: float = 1.0,
                 share_prompt: bool = True, share_vision: bool = True,
                 entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(o_t | q, o_<t) and the entropy at each completion position: (B*G, C) each.
        inputs: the left-padded prompt batch (B rows); completion_ids (B*G, C), right-padded.
        share_prompt: run each prompt once and its G completions against its KV cache (the default);
        else run prompt + completion for every row, the vision tower once a question (share_vision)
        or once a row (as peers do)."""
        G = group_size
        position_ids, deltas = self.rope_index(inputs)                          # (3, B, P), (B, 1)
        lengths = inputs["attention_mask"].sum(1)                               # (B,)
        C = completion_ids.shape[1]
        steps = torch.arange(C, device=completion_ids.device)
        # completion token t of question b sits at L_b + t + delta_b on all three mRoPE axes
        completion_pos = (lengths[:, None] + deltas + steps[None, :])           # (B, C)
        completion_pos = completion_pos.repeat_interleave(G, dim=0)[None].expand(3, -1, -1)     # (3, B*G, C)
        attention_mask = torch.cat([inputs["attention_mask"].repeat_interleave(G, dim=0),
                                    torch.ones_like(completion_ids)], dim=1)    # (B*G, P+C)
        if share_prompt:
            hidden, zero = self._shared_prompt_hidden(inputs, position_ids, completion_ids, completion_pos,
                                                      attention_mask, G)
        else:
            hidden, zero = self._repeated_hidden(inputs, position_ids, completion_ids, completion_pos,
                                                 attention_mask, G, share_vision)
        return self._head(hidden, completion_ids, temperature, zero, entropy_grad)

    def _shared_prompt_hidden(self, inputs, position_ids, completion_ids, completion_pos, attention_mask, G):
        """The prompt once (B rows), its per-layer K/V kept in the autograd graph and repeated G times,
        then the B*G completions against it. Backward sums the G completions' gradients into the one
        prompt computation. Returns the hidden states that predict each completion token (B*G, C, H)."""
        encoded, zero = self.visual_features(inputs)
        record = Cache(layer_class_to_replicate=_RecordLayer)
        prompt = self.inner(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            position_ids=position_ids, mm_encoder_outputs=encoded, cache=record,
                            use_cache=True).last_hidden_state                   # (B, P, H)
        prefix = Cache(layers=[_PrefixLayer(layer, G) for layer in record.layers])
        completion = self.inner(input_ids=completion_ids, attention_mask=attention_mask, position_ids=completion_pos,
                                cache=prefix, use_cache=True).last_hidden_state  # (B*G, C, H)
        # o_0 is predicted by the prompt's last position (left padding: the last real token), o_t by o_{t-1}
        first = prompt[:, -1:].repeat_interleave(G, dim=0)                      # (B*G, 1, H)
        return torch.cat([first, completion[:, :-1]], dim=1), zero              # (B*G, C, H)

    def _repeated_hidden(self, inputs, position_ids, completion_ids, completion_pos, attention_mask, G, share_vision):
        """Prompt + completion for every one of the B*G rows (the peers' way; kept for comparison)."""
        position_ids = torch.cat([position_ids.repeat_interleave(G, dim=1), completion_pos], dim=2)   # (3, B*G, P+C)
        input_ids = torch.cat([inputs["input_ids"].repeat_interleave(G, dim=0), completion_ids], dim=1)  # (B*G, P+C)
        encoded, zero = self.visual_features(inputs, repeats=G, share=share_vision)
        hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            mm_encoder_outputs=encoded, use_cache=False).last_hidden_state     # (B*G, P+C, H)
        P, C = inputs["input_ids"].shape[1], completion_ids.shape[1]
        return hidden[:, P - 1:P + C - 1], zero                                 # (B*G, C, H) predicts o_t

    def _head(self, hidden, completion_ids, temperature, zero, entropy_grad=False):
        """LM head and log-softmax at the completion positions only, chunk by chunk."""
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), completion_ids.reshape(-1)
        weight = self.model.lm_head.weight                                      # (V, H)
        suppress = torch.tensor(self.suppress_token_ids, dtype=torch.long, device=weight.device)
        logps, entropies = [], []
        for start in range(0, flat_t.numel(), self.chunk_size):
            h, t = flat_h[start:start + self.chunk_size], flat_t[start:start + self.chunk_size]
            if torch.is_grad_enabled():
                lp, ent = checkpoint(_chunk_logprobs, h, weight, t, temperature, suppress, entropy_grad,
                                     use_reentrant=False)
            else:
                lp, ent = _chunk_logprobs(h, weight, t, temperature, suppress)
            logps.append(lp), entropies.append(ent)
        shape = completion_ids.shape
        return torch.cat(logps).view(shape) + zero, torch.cat(entropies).view(shape) + zero   # not views (FSDP2)


def _deepstack(result) -> list:
    """Qwen3-VL's DeepStack features (one (tokens, H) tensor a chosen vision layer, each added to the
    hidden states of the first decoder layers at the visual positions); none for the other families."""
    return list(getattr(result, "deepstack_features", None) or [])


class _RecordLayer(DynamicLayer):
    """A prompt's K/V, prefilled from empty: stores this pass's K/V (overwriting, not appending) and
    returns them, so an activation-checkpointing replay computes the same thing again."""
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """A read-only prefix, each prompt's K/V repeated for its G rows: attention sees prefix ⊕ new and
    nothing is stored, so a checkpointing replay sees the same prefix."""
    def __init__(self, recorded: DynamicLayer, repeats: int):
        super().__init__()
        self.lazy_initialization(recorded.keys, recorded.values)
        self.keys = recorded.keys.repeat_interleave(repeats, dim=0)            # (B*G, kv heads, P, d)
        self.values = recorded.values.repeat_interleave(repeats, dim=0)

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)
