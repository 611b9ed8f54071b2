"""One decoding step for G completions a question, each prompt's K/V read once (shared-prefix attention).

Decoding is bound by memory reads: every step reads the weights once and the K/V cache once. Rows of
the same question share their prompt, so the cache keeps each prompt's K/V once (the prefill's own
tensors, not copied) and each row's new K/V apart, and attention combines the two with one softmax:
for row n = b*G + g and query head j (key/value head j // r, r = H / H_kv),
    s_pre = q K_pre[b]^T * scale          (P,)    -inf at the prompt's left padding
    s_own = q K_own[n, :t+1]^T * scale     (t+1,)  the row's own tokens, the current one included
    w = softmax([s_pre, s_own])            one softmax over the concatenation
    o = w_pre V_pre[b] + w_own V_own[n]
The prefix product is one matmul a (question, K/V head) with the G rows x r heads as its rows, so each
prompt K/V element is read once a step instead of G*r times. This is shared-prefix ("cascade")
attention: Hydragen (Juravsky et al. 2024), FlashInfer's cascade attention, vLLM's cascade attention.

The step is written out over the Hugging Face model's own modules (norms, projections, MLP, rotary
table), so it holds for Qwen2-VL and Qwen2.5-VL alike (the same text decoder) and for Qwen3-VL's (q and
k RMS-normalised per head before RoPE; its interleaved mRoPE is the model's own rotary table, and
DeepStack touches only visual positions, which decoding never has); decoding text tokens, the three
mRoPE axes share one position, p = L_b + t + delta_b. It calls the decoder layers' parts
directly, so under FSDP2 it must run inside `sbr.fsdp.gathered` (parameters already all-gathered).

Static shapes: eager decoding reads the own slots 0..t; a compiled step reads the whole capacity,
masked beyond t, t and the positions are tensors (nothing in the step reads a value back to the
host), and the prompt length is the one dynamic dimension: one compiled graph serves every prompt
length, and the prefix is left-padded to a multiple of `bucket` so that CUDA graphs, recorded once a
shape, see few shapes.

Shapes: B questions, G rows a question, N = B*G, H / H_kv query / key-value heads, d head size,
P prompt length (padded), T new-token capacity.
"""
import math

import torch
import torch.nn.functional as F


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result, never rounded to bf16 on the way: a bf16 product's fp32 accumulator
    would otherwise be rounded to 8 bits of mantissa (logits 0.125 apart at |z| in 16..32, attention
    scores likewise), where flash-attn and an fp32 log-softmax keep fp32. On CUDA, cuBLAS writes the fp32
    accumulator directly (torch.mm/bmm out_dtype: no fp32 copy of the operands, the bf16 GEMM's speed);
    elsewhere the operands are upcast (exact: bf16 values are fp32 values)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dim() in (2, 3) and a.dim() == b.dim():
        try:
            return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):           # a torch without out_dtype for this dtype
            pass
    return a.float() @ b.float()


def logits_fp32(hidden: torch.Tensor, lm_head: torch.nn.Linear) -> torch.Tensor:
    """The LM head's output for hidden (n, H) in fp32 (see matmul_fp32): (n, V)."""
    z = matmul_fp32(hidden, lm_head.weight.t())
    return z if lm_head.bias is None else z + lm_head.bias.float()


class GroupCache:
    """Per layer: the prompt's K/V once, (B, H_kv, P, d), and each row's own K/V, (B, H_kv, G, T, d).

    `pool` (a dict kept by the caller across rollouts; compiled decoding only): every tensor the step
    reads comes from it and keeps its address from rollout to rollout, as CUDA graphs need
    (sbr/graphs.py). The prompt's K/V are copied, left-padded to a multiple of `bucket`, into a view
    at the start of one buffer a layer sized for the longest bucket so far, so every bucket shares one
    allocation and its address (A -> B -> A reallocates nothing); a new cache from the same pool
    overwrites the previous one's buffers, so only the latest is valid. Without a pool the prefill's
    tensors are used as they are and only the own buffers are allocated."""

    def __init__(self, prefill_cache, prompt_mask: torch.Tensor, group_size: int, capacity: int, *,
                 bucket: int = 1, pool: dict | None = None):
        keys = [layer.keys for layer in prefill_cache.layers]
        values = [layer.values for layer in prefill_cache.layers]
        B, kv_heads, P, d = keys[0].shape
        shape = (B, kv_heads, group_size, capacity, d)
        self.group_size, self.capacity = group_size, capacity
        if pool is None:
            self.pre_k, self.pre_v = keys, values
            # additive bias (B, 1, 1, 1, P): 0 on prompt tokens, -inf on padding; None when nothing is padded
            self.pre_bias = None if bool(prompt_mask.all()) else _bias(prompt_mask, keys[0].new_empty(prompt_mask.shape, dtype=torch.float32))
            self.own_k = [keys[0].new_zeros(shape) for _ in keys]
            self.own_v = [keys[0].new_zeros(shape) for _ in keys]
            self.slots = torch.arange(capacity, device=keys[0].device)   # t as a 0-dim view: no host copy
            return
        pad = -P % bucket
        self.pre_k = [_padded(pool, ("k", i), k, pad) for i, k in enumerate(keys)]
        self.pre_v = [_padded(pool, ("v", i), v, pad) for i, v in enumerate(values)]
        mask = F.pad(prompt_mask, (pad, 0))
        self.pre_bias = _bias(mask, _view(pool, "bias", mask.shape, keys[0], torch.float32))  # always: one graph
        torch._dynamo.mark_dynamic(self.pre_bias, 4)
        self.own_k = [_view(pool, ("own k", i), shape, keys[0]).zero_() for i in range(len(keys))]
        self.own_v = [_view(pool, ("own v", i), shape, keys[0]).zero_() for i in range(len(keys))]
        self.slots = _view(pool, "slots", (capacity,), keys[0], torch.long)
        self.slots.copy_(torch.arange(capacity, device=keys[0].device))


def _bias(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1, P) into `out`: 0 where mask is 1, -inf where it is 0 (left padding)."""
    out = out.view(mask.shape).zero_().masked_fill_(mask == 0, float("-inf"))
    return out[:, None, None, None, :]


def _view(pool: dict, name, shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A contiguous `shape` view at the start of the pool's flat buffer `name`, which is replaced (a new
    address) only when it is too small or of another dtype or device."""
    dtype = dtype or like.dtype
    n = math.prod(shape)
    buf = pool.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != like.device:
        pool[name] = buf = torch.zeros(n, dtype=dtype, device=like.device)
    return buf[:n].view(shape)


def _padded(pool: dict, name, x: torch.Tensor, pad: int) -> torch.Tensor:
    """x (B, H_kv, P, d) copied into a pooled (B, H_kv, pad + P, d) view, zeros first (masked, but
    never stale NaNs that 0 x NaN would spread)."""
    B, heads, P, d = x.shape
    buf = _view(pool, name, (B, heads, pad + P, d), x)
    torch._dynamo.mark_dynamic(buf, 2)                # the prompt length: one graph for all of them
    buf[:, :, :pad].zero_()
    buf[:, :, pad:].copy_(x)
    return buf


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x cos + rotate_half(x) sin, with rotate_half([x1, x2]) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend(q, pre_k, pre_v, pre_bias, own_k, own_v, own_bias, scale: float) -> torch.Tensor:
    """q (B, H_kv, G, r, d); pre_k/pre_v (B, H_kv, P, d); own_k/own_v (B, H_kv, G, S, d) -> (B, H_kv, G, r, d).
    Biases are additive (0 / -inf) or None, broadcast to the scores; the current token is always visible."""
    B, kv_heads, G, r, d = q.shape
    qp = q.reshape(B * kv_heads, G * r, d)
    s_pre = matmul_fp32(qp, pre_k.reshape(B * kv_heads, -1, d).transpose(-1, -2)).view(B, kv_heads, G, r, -1)
    s_own = matmul_fp32(q.reshape(-1, r, d), own_k.reshape(-1, own_k.shape[-2], d).transpose(-1, -2))
    s = torch.cat([s_pre, s_own.view(B, kv_heads, G, r, -1)], dim=-1) * scale   # (B, H_kv, G, r, P+S) fp32
    P = s_pre.shape[-1]
    if pre_bias is not None:
        s[..., :P] += pre_bias
    if own_bias is not None:
        s[..., P:] += own_bias
    w = torch.softmax(s, dim=-1).to(q.dtype)                              # one softmax over prompt + own
    o = (w[..., :P].reshape(B, kv_heads, G * r, P) @ pre_v).view(B, kv_heads, G, r, d)
    return o + w[..., P:] @ own_v                                         # (B, H_kv, G, r, d)


def decode_step(model, cache: GroupCache, token_ids: torch.Tensor, positions: torch.Tensor,
                t: int | torch.Tensor) -> torch.Tensor:
    """token_ids (N,) and their mRoPE positions (N,), t the index of these tokens among the new ones
    (their slot in the own cache) -> next-token logits (N, V) fp32.
    t an int: eager, reads own slots 0..t. t a 0-dim tensor: static shapes, reads every slot, masked
    beyond t (what `torch.compile` and CUDA graphs need)."""
    text = model.model.language_model
    N, G = token_ids.shape[0], cache.group_size
    B = N // G
    static = torch.is_tensor(t)
    x = text.embed_tokens(token_ids)[:, None]                             # (N, 1, H*d)
    cos, sin = text.rotary_emb(x, positions.view(1, N, 1).expand(3, N, 1))  # (N, 1, d) each
    cos, sin = cos[:, :, None], sin[:, :, None]                           # (N, 1, 1, d)
    own_bias = None
    if static:                                                            # (S,): 0 up to t, -inf beyond
        own_bias = torch.zeros(cache.capacity, device=token_ids.device).masked_fill(cache.slots > t, float("-inf"))
    for i, layer in enumerate(text.layers):
        attn = layer.self_attn
        d = attn.head_dim
        h = layer.input_layernorm(x)                                      # (N, 1, H*d)
        q, k = attn.q_proj(h).view(N, 1, -1, d), attn.k_proj(h).view(N, 1, -1, d)   # (N, 1, H or H_kv, d)
        if hasattr(attn, "q_norm"):                                       # Qwen3: RMSNorm of each head, then RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        v = attn.v_proj(h).view(N, 1, -1, d)                              # (N, 1, H_kv, d)
        kv_heads = k.shape[2]
        k = k.view(B, G, kv_heads, 1, d).transpose(1, 2)                  # (B, H_kv, G, 1, d)
        v = v.view(B, G, kv_heads, 1, d).transpose(1, 2)
        own_k, own_v = cache.own_k[i], cache.own_v[i]                     # (B, H_kv, G, T, d)
        if static:
            own_k.index_copy_(3, t.view(1), k)
            own_v.index_copy_(3, t.view(1), v)
        else:
            own_k[:, :, :, t:t + 1] = k
            own_v[:, :, :, t:t + 1] = v
            own_k, own_v = own_k[:, :, :, :t + 1], own_v[:, :, :, :t + 1]
        q = q.view(B, G, kv_heads, -1, d).transpose(1, 2)                 # (B, H_kv, G, r, d)
        o = attend(q, cache.pre_k[i], cache.pre_v[i], cache.pre_bias, own_k, own_v, own_bias, attn.scaling)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(N, 1, -1))          # (N, 1, H*d)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return logits_fp32(text.norm(x)[:, 0], model.lm_head)                # (N, V) fp32
