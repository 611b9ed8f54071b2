"""Group rollouts: G sampled completions per question, the prompt prefilled once.

Each question's prompt (video and image included) is run once; the G completions are decoded
together from its K/V, which the decoding cache holds once for the group (sbr/decode.py). Per step:
    z = logits / temperature, the policy's suppressed (visual) tokens set to -inf, top-k then top-p filtering, sample
    (greedy takes the argmax). Rows stop at their first end-of-turn token; later tokens are padding.
`logp` records log softmax(z)[token] of the unfiltered tempered distribution, the quantity the
training forward computes (a test checks the two agree; TRL and the authors' trainer do the same).
A row stops at the first of `eos_token_ids` (the authors': `<|im_end|>` and `<|endoftext|>`).
Completion mask: 1 up to and including that stop token; a row that never stops is truncated and,
with `mask_truncated`, masked out entirely (its `lengths` entry still counts what was generated).
Whether every row has stopped is read back every `check_every` tokens, not every token (a GPU runs
ahead of the host meanwhile); the steps after a row's stop only write padding.
"""
from dataclasses import dataclass

import torch

from sbr.fsdp import gathered


@dataclass
class Rollout:
    completion_ids: torch.Tensor    # (B*G, C) right-padded with pad_token_id
    completion_mask: torch.Tensor   # (B*G, C) 1 on tokens up to and including the first end-of-turn
    logp: torch.Tensor              # (B*G, C) sampling-time log-probs (0 where masked)
    truncated: torch.Tensor         # (B*G,) bool: no stop token within max_new_tokens
    lengths: torch.Tensor           # (B*G,) tokens generated, stop token included (before mask_truncated)
    entropy: torch.Tensor | None = None   # (B*G, C) the sampled distribution's entropy (entropies=True)


def filter_logits(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the k largest logits (k > 0), then the smallest set whose probability reaches top_p."""
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]                       # (N, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)                # (N, V)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)                         # (N, V)
        drop = cum - torch.softmax(sorted_z, dim=-1) >= top_p                    # mass before this token
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(-1, order, sorted_z)
    return z


@torch.no_grad()
def sample(policy, inputs: dict, group_size: int, *, max_new_tokens: int, eos_token_ids: list[int],
           pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, mask_truncated: bool = False,
           generators: list[torch.Generator] | None = None, check_every: int = 8, entropies: bool = False) -> Rollout:
    """`generators`: one per question, so a question's completions do not depend on which rank or
    batch it was sampled in (None: the global RNG). Under FSDP2 the parameters are gathered once for
    the whole rollout (sbr.fsdp.gathered). `entropies`: also record the entropy of each token's tempered,
    unfiltered distribution (what the training forward computes)."""
    G = group_size
    with gathered(policy):                                                     # FSDP2: all-gather once
        logits, prefill, lengths, deltas = policy.prefill(inputs)              # (B, V), cache, (B,), (B, 1)
        cache = policy.group_cache(prefill, inputs["attention_mask"], G, max_new_tokens)
        del prefill
        logits = logits.repeat_interleave(G, dim=0)                            # (N, V), N = B*G
        start = (lengths + deltas[:, 0]).repeat_interleave(G)                 # (N,) position of new token 0
        N, device = logits.shape[0], logits.device
        eos = torch.tensor(list(eos_token_ids), device=device)
        suppress = torch.tensor(policy.suppress_token_ids, dtype=torch.long, device=device)
        tokens = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros((N, max_new_tokens), device=device)
        entropy = torch.zeros((N, max_new_tokens), device=device) if entropies else None
        mask = torch.zeros((N, max_new_tokens), dtype=torch.long, device=device)
        done = torch.zeros(N, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            z = logits / temperature                                           # (N, V)
            if suppress.numel():
                z[:, suppress] = float("-inf")
            log_probs = torch.log_softmax(z, dim=-1)                           # (N, V)
            if greedy:
                next_ids = z.argmax(-1)                                        # (N,)
            else:
                probs = torch.softmax(filter_logits(z, top_k, top_p), dim=-1)   # (N, V)
                if generators is None:
                    next_ids = torch.multinomial(probs, 1).squeeze(-1)
                else:
                    next_ids = torch.cat([torch.multinomial(p, 1, generator=g).squeeze(-1)
                                          for p, g in zip(probs.split(G), generators)])
            next_ids = torch.where(done, torch.full_like(next_ids, pad_token_id), next_ids)
            tokens[:, t] = next_ids
            mask[:, t] = (~done).long()
            logps[:, t] = torch.where(done, 0.0, log_probs.gather(-1, next_ids[:, None]).squeeze(-1))
            if entropies:                                                      # -Σ p log p, 0 log 0 = 0
                entropy[:, t] = torch.where(done, 0.0, torch.special.entr(log_probs.exp()).sum(-1))
            done = done | torch.isin(next_ids, eos)
            if t == max_new_tokens - 1 or (t + 1) % check_every == 0 and bool(done.all()):
                break
            # token t sits at L_b + t + delta_b on all three mRoPE axes
            logits = policy.decode(next_ids, start + t, t, cache)              # (N, V)
    lengths = mask.sum(1)                                                      # (N,)
    C = max(int(lengths.max().item()), 1)                                      # trim the all-padding tail
    truncated = ~done
    if mask_truncated:
        mask = mask * (~truncated)[:, None].long()
    return Rollout(tokens[:, :C], mask[:, :C], logps[:, :C], truncated, lengths,
                   None if entropy is None else entropy[:, :C])
