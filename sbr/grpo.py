r"""The GRPO objective: tensors in, loss out. Imports torch only; change it here for your paper.

For a question q, G completions o_1..o_G are sampled from π_old and scored r_1..r_G. Each token of
o_i gets the same advantage (DeepSeekMath, Shao et al. 2024):

    Â_i = (r_i - mean(r)) / (std(r) + ε_std)        std unbiased, within the group of G

and the policy π_θ minimises, per token t of completion i,

    ℓ_i,t = -min( ρ_i,t Â_i , clip(ρ_i,t, 1 - ε_low, 1 + ε_high) Â_i ) + β KL_i,t
    ρ_i,t  = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
    KL_i,t = e^d - d - 1,   d = clamp(log π_ref - log π_θ, -c, c)
                                  (Schulman's k3 estimator, ≥ 0; the authors clamp d to c = 11, so
                                   one token far from π_ref costs at most e^11 ≈ 6e4, never inf)

aggregated (`loss_type`) as
    "grpo"     1/G Σ_i 1/|o_i| Σ_t ℓ_i,t          per-sequence mean, then mean over sequences
                                                   (DeepSeekMath; the SEED-Bench-R1 release)
    "bnpo"     Σ_i,t ℓ_i,t / Σ_i |o_i|             token mean over the batch (TRL's "bnpo")
    "dr_grpo"  Σ_i,t ℓ_i,t / (G · L_max)            constant normaliser, no length bias
                                                   (Dr. GRPO, Liu et al. 2025)
    "dapo"     Σ_i,t ℓ_i,t / num_items              token mean over the whole step on all ranks:
                                                   num_items = global completion tokens / world size,
                                                   so averaging gradients over ranks gives the global
                                                   token mean (DAPO, Yu et al. 2025)

Masked positions (past a completion's end, or whole rows dropped by `mask_truncated`) are set to 0
before any exp, so their values, however extreme, never reach the loss or its gradient (0 · inf would
be NaN); a step with no completion token at all has loss 0 under every `loss_type`.

With one update per rollout (the paper's recipe) π_old = π_θ, ρ = 1 and clipping never bites; pass
old_logp=None and ρ = exp(logp - logp.detach()), which is 1 with the gradient of log π_θ, so the
loss's gradient is REINFORCE's: -Â_i ∇ log π_θ(o_i,t).
"""
import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4,
                     batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Â = (r - group mean) / (std + eps) for groups of `group_size` consecutive completions.
    scale: "group" (the group's unbiased std, the paper's), "batch" (the std of `batch_rewards`: pass
    every rank's rewards of the step, as TRL does; default `rewards`), "none" (centre only, Dr. GRPO).
    A group whose rewards are all equal gets Â = 0, never NaN."""
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 completions a group, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)                       # (B, G)
    centred = r - r.mean(dim=1, keepdim=True)                      # (B, G)
    if scale == "group":
        adv = centred / (r.std(dim=1, keepdim=True) + eps)         # (B, G)
    elif scale == "batch":
        everyone = rewards if batch_rewards is None else batch_rewards
        adv = centred / (everyone.float().std() + eps)             # (B, G)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return adv.reshape(-1)                                         # (B*G,)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, completion_mask: torch.Tensor, *, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, beta: float = 0.0, kl_clamp: float | None = 11.0,
              loss_type: str = "grpo", max_completion_length: int | None = None, num_items: float | None = None):
    """logp, old_logp, ref_logp: (N, T) log-probs of the sampled tokens under π_θ, π_old, π_ref;
    advantages: (N,); completion_mask: (N, T), 1 on completion tokens; kl_clamp: c above (None: no
    clamp). Returns (loss, metrics)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    keep = completion_mask.bool()                                           # (N, T)
    mask = keep.to(logp.dtype)                                              # (N, T)
    old_logp = logp.detach() if old_logp is None else old_logp              # (N, T)
    ratio = torch.exp(torch.where(keep, logp - old_logp, 0.0))              # (N, T) ρ, 1 where masked
    adv = advantages.to(logp.dtype)[:, None]                                # (N, 1) Â
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)         # (N, T)
    per_token = -torch.min(ratio * adv, clipped * adv)                      # (N, T)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        d = torch.where(keep, ref_logp - logp, 0.0)                         # (N, T) log π_ref/π_θ
        if kl_clamp is not None:
            d = d.clamp(-kl_clamp, kl_clamp)                                # (N, T) the authors' ±11
        kl = torch.exp(d) - d - 1                                           # (N, T) k3
        per_token = per_token + beta * kl                                   # (N, T)

    masked = torch.where(keep, per_token, 0.0)                              # (N, T)
    if loss_type == "grpo":
        loss = (masked.sum(1) / mask.sum(1).clamp(min=1)).mean()            # () seq mean, then mean
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1)                       # () token mean
    elif loss_type == "dr_grpo":
        if not max_completion_length or max_completion_length < 1:
            raise ValueError(f"dr_grpo needs max_completion_length >= 1, got {max_completion_length}")
        loss = masked.sum() / (logp.shape[0] * max_completion_length)      # ()
    else:  # dapo: num_items = 0 only when no rank has a completion token, and then the sum is 0 too
        n = mask.sum().clamp(min=1) if num_items is None else (num_items if num_items > 0 else 1.0)
        loss = masked.sum() / n                                             # ()

    with torch.no_grad():
        n = mask.sum().clamp(min=1)

        def mean(x):
            return ((x.to(mask.dtype) * mask).sum() / n).item()
        metrics = {
            "kl": mean(kl) if kl is not None else 0.0,
            "clip_low": mean((ratio < 1 - epsilon_low) & (adv < 0)),
            "clip_high": mean((ratio > 1 + epsilon_high) & (adv > 0)),
            "ratio": mean(ratio),
            "loss_per_token": mean(per_token),
            "tokens": mask.sum().item(),
        }
    return loss, metrics


# ---------------------------------------------------------------------------- GRPO-CARE
def answer_likelihood(ref_logp: torch.Tensor, answer_mask: torch.Tensor, cap: float = 0.95) -> torch.Tensor:
    r"""How likely the reference finds each completion's answer given its own reasoning (GRPO-CARE,
    Chen et al. 2025): the per-token geometric mean of π_ref over the answer tokens a_i (the letter
    inside <answer>...</answer>), teacher-forced on the question and the completion so far, capped:
        ĉ_i = min( exp( Σ_t∈a_i log π_ref(o_i,t | q, o_i,<t) / |a_i| ), cap )
    ref_logp, answer_mask (N, C) -> (N,). A completion with no answer tokens gets `cap` (exp 0 capped,
    as in the authors' code); it is never correct, so it never earns a bonus either."""
    m = answer_mask.float()                                                   # (N, C)
    mean = torch.where(m.bool(), ref_logp.float(), 0.0).sum(1) / m.sum(1).clamp(min=1)   # (N,)
    return mean.exp().clamp(max=cap)                                          # (N,)


def consistency_bonus(accuracy: torch.Tensor, likelihood: torch.Tensor, group_size: int, *,
                      coefficient: float = 0.5, margin: float = 0.0) -> torch.Tensor:
    r"""GRPO-CARE's consistency bonus, added to the reward before group normalisation. Within a group,
    let A be its accurate completions (r_acc,i > 0.1 and r_acc,i ≥ the group's mean r_acc: with 0/1
    accuracy, the correct ones) and c̄_A = mean_{j∈A} ĉ_j; then
        b_i = λ r_acc,i   if i ∈ A and ĉ_i ≥ c̄_A - m,      else 0
    (λ = `coefficient`, 0.5 in the paper's runs; m = `margin`, 0 for SEED-Bench-R1). A group with no
    accurate completion gets no bonus. accuracy, likelihood (B*G,) -> bonus (B*G,)."""
    acc = accuracy.float().view(-1, group_size)                               # (B, G)
    c = likelihood.float().view(-1, group_size)                               # (B, G)
    accurate = (acc > 0.1) & (acc >= acc.mean(1, keepdim=True))               # (B, G)
    n = accurate.sum(1, keepdim=True)                                         # (B, 1)
    mean_c = torch.where(accurate, c, 0.0).sum(1, keepdim=True) / n.clamp(min=1)   # (B, 1) c̄_A
    earns = accurate & (c >= mean_c - margin)                                 # (B, G)
    return torch.where(earns, coefficient * acc, 0.0).view(-1)                # (B*G,)
