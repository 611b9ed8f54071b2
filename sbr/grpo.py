r"""The GRPO objective and its variants: tensors in, loss out. Imports torch only; a paper changes it here.

For a question q, G completions o_1..o_G are sampled from π_old and scored r_1..r_G. Each token of
o_i gets the same advantage (DeepSeekMath, Shao et al. 2024):

    Â_i = (r_i - mean(r)) / (std(r) + ε_std)        std unbiased, within the group of G

The importance weight compares π_θ with the policy that sampled (π_old; = π_θ with one update a
rollout, the paper's recipe, so ρ = exp(logp - logp.detach()) = 1 with the gradient of log π_θ):
    "token"    ρ_i,t = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
    "sequence" ρ_i = exp( 1/|o_i| Σ_t log ρ_i,t ), one for every token of o_i      (GSPO, Zheng et al. 2025)
(`importance_sampling_level`). Each loss type is one entry of LOSS_TYPES: a per-token term and an
aggregation. The terms (sg = stop-gradient):
    clip   ℓ = -min(ρ' Â, clip(ρ, 1 - ε_low, 1 + ε_high) Â),  ρ' = min(ρ, δ) with `delta` (two-sided
           clipping, Ichihara et al. 2025), else ρ                     (PPO's, GRPO's; DAPO raises ε_high)
    cispo  ℓ = -sg(min(ρ, ε_high)) Â log π_θ      ε_high is the cap    (CISPO: MiniMax-M1, 2025)
    sapo   ℓ = -(4/τ) σ(τ (ρ - 1)) Â,  τ = τ_pos if Â > 0 else τ_neg   (SAPO, Gao et al. 2025)
    vespo  ℓ = -sg(φ(w_i)) Â log π_θ,  φ(w) = e^λ w^k e^(-λ w) (φ(1) = 1), w_i = exp Σ_t log ρ_i,t,
           (k, λ) = (k_pos, λ_pos) if Â ≥ 0 else (k_neg, λ_neg)      (VESPO, 2025)
then, in this order (as TRL's GRPOTrainer):
    × m_off     `off_policy_mask_threshold` δ_off: a sequence with Â < 0 whose mean over its tokens of
                log π_sample - log π_θ exceeds δ_off is dropped               (DeepSeek-V3.2's OPSM)
    × m_H       `top_entropy_quantile` q < 1: only the fraction q of the step's tokens with the highest
                entropy carry the policy term            (Wang et al. 2025, "Beyond the 80/20 rule");
                the trainer selects them once a step, over every rank, from the rollout's entropies (the
                same weights as the first training forward), so micro-batching cannot change the set;
                TRL selects per micro-batch from each forward's, so with μ > 1 its set moves, sbr's not
    × min(π_old/π_sample, C)   `rollout_is_cap` C: truncated importance sampling of the rollout's
                sampler (Yao et al. 2025; TRL's vllm_importance_sampling_correction, token_truncate);
                vespo folds it into w_i instead. π_sample is the tempered distribution before top-k/top-p
                (what training computes), so this and OPSM see kernel and precision drift, not the filter
    + β KL      KL = e^d - d - 1, d = clamp(log π_ref - log π_θ, -c, c) (Schulman's k3, ≥ 0; the
                authors clamp d to c = 11: one token far from π_ref costs at most e^11 ≈ 6e4), × ρ with
                `use_bias_correction_kl`
The aggregations, over the whole step (every micro-batch of this rank; "all ranks" where said), so
that splitting a step into micro-batches never changes its loss:
    "sequence mean"  1/S Σ_i 1/|o_i| Σ_t ℓ_i,t   grpo, sapo    S: the step's completions on this rank
    "token mean"     Σ_i,t ℓ_i,t / T             bnpo          T: the step's completion tokens on this rank
                                                               (TRL's bnpo divides by each micro-batch's)
    "constant"       Σ_i,t ℓ_i,t / (S L_max)     dr_grpo       no length bias (Dr. GRPO, Liu et al. 2025)
    "global tokens"  Σ_i,t ℓ_i,t / (T_all / W)   dapo, cispo, vespo   all ranks' tokens over W ranks:
                                                 averaging gradients over ranks gives the global token
                                                 mean (DAPO, Yu et al. 2025)
    "sequence sum"   1/S Σ_i Σ_t ℓ_i,t           luspo         each sequence weighted by its length
                                                               (LUSPO, 2025; with importance_sampling_level
                                                               "sequence", as it is meant)
A micro-batch's loss is its share of the step's; the trainer sums them (num_sequences, num_tokens,
num_items are the step's counts; each defaults to this batch's own, i.e. one call is the whole step).
An entropy bonus -c H̄ (`entropy_coef`): H̄ the mean entropy over the tokens m_H keeps on all ranks,
whatever the aggregation; for the "global tokens" ones, as TRL, Σ H over the kept tokens / (T_all / W).

Masked positions (past a completion's end, or whole rows dropped by `mask_truncated`) are set to 0
before any exp, so their values, however extreme, never reach the loss or its gradient (0 · inf would
be NaN); a step with no completion token at all has loss 0 under every loss type.
"""
import math

import torch


def _clip(ratio, adv, logp, eps_low, eps_high, delta, **_):
    first = ratio if delta is None else ratio.clamp(max=delta)                    # two-sided clipping
    return -torch.min(first * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)


def _cispo(ratio, adv, logp, eps_high, **_):
    return -ratio.clamp(max=eps_high).detach() * adv * logp


def _sapo(ratio, adv, logp, sapo_temperature_pos, sapo_temperature_neg, **_):
    tau = torch.where(adv > 0, adv.new_tensor(sapo_temperature_pos), adv.new_tensor(sapo_temperature_neg))
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


def _vespo(ratio, adv, logp, log_w, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, **_):
    with torch.no_grad():                                                        # φ only scales the gradient
        pos = adv >= 0
        k = torch.where(pos, adv.new_tensor(vespo_k_pos), adv.new_tensor(vespo_k_neg))
        lam = torch.where(pos, adv.new_tensor(vespo_lambda_pos), adv.new_tensor(vespo_lambda_neg)).clamp(min=1e-4)
        log_w = log_w.clamp(math.log(1e-8), 20.0)                                 # (N, 1)
        phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(0.0, 0.0, 0.0)
    return -phi * adv * logp


# name -> (per-token term, aggregation)
LOSS_TYPES = {"grpo": (_clip, "sequence mean"), "bnpo": (_clip, "token mean"), "dr_grpo": (_clip, "constant"),
              "dapo": (_clip, "global tokens"), "luspo": (_clip, "sequence sum"), "cispo": (_cispo, "global tokens"),
              "sapo": (_sapo, "sequence mean"), "vespo": (_vespo, "global tokens")}


def check_settings(*, loss_type: str, epsilon_high: float, delta: float | None = None, **_) -> list[str]:
    """Settings that run but silently scale or flatten the gradient, each a message naming the setting
    as `--name` (the trainer's flags have grpo_loss's names)."""
    bad, term = [], LOSS_TYPES[loss_type][0]
    if term is _cispo and epsilon_high <= 1:
        bad.append(f"--loss_type {loss_type}: --epsilon_high is CISPO's cap on the ratio itself (MiniMax-M1: 5); "
                   f"{epsilon_high} would scale every token's gradient by at most {epsilon_high}")
    if term is _clip and delta is not None and delta <= 1 + epsilon_high:
        bad.append(f"--delta {delta}: two-sided clipping caps the ratio above 1 + --epsilon_high "
                   f"({1 + epsilon_high:g}); a smaller delta clips every ratio (TRL suggests 4)")
    return bad


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


def high_entropy_mask(entropies: torch.Tensor, completion_mask: torch.Tensor, quantile: float,
                      pool: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens whose entropy is at least the `quantile`-quantile of `pool` (the step's completion-token
    entropies on every rank; default this batch's): (N, T) bool, False off the completion."""
    keep = completion_mask.bool()
    dtype = torch.promote_types(entropies.dtype, torch.float32)            # quantile needs fp32 or fp64
    pool = (entropies[keep] if pool is None else pool).to(dtype)
    if pool.numel() == 0:
        return torch.zeros_like(keep)
    return (entropies.to(dtype) >= torch.quantile(pool, 1 - quantile)) & keep


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, completion_mask: torch.Tensor, *, loss_type: str = "grpo",
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: float | None = None,
              beta: float = 0.0, kl_clamp: float | None = 11.0, use_bias_correction_kl: bool = False,
              importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
              vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, top_entropy_quantile: float = 1.0,
              entropies: torch.Tensor | None = None, entropy_mask: torch.Tensor | None = None,
              entropy_coef: float = 0.0, off_policy_mask_threshold: float | None = None,
              sampling_logp: torch.Tensor | None = None, rollout_is_cap: float | None = None,
              max_completion_length: int | None = None, num_sequences: int | None = None,
              num_tokens: float | None = None, num_items: float | None = None,
              num_entropy_items: float | None = None):
    """logp, old_logp, ref_logp, sampling_logp: (N, T) log-probs of the sampled tokens under π_θ, π_old,
    π_ref and the rollout's sampler; advantages (N,); completion_mask (N, T), 1 on completion tokens;
    entropies (N, T) this forward's (with their gradient, for the entropy bonus); entropy_mask (N, T) the
    step's high-entropy tokens (high_entropy_mask over all ranks; default: from `entropies` here);
    kl_clamp: c above (None: no clamp); num_*: the step's counts (module docstring). Keyword names are
    TRL GRPOConfig's. Returns (loss, metrics)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    term, aggregation = LOSS_TYPES[loss_type]
    keep = completion_mask.bool()                                           # (N, T)
    mask = keep.to(logp.dtype)                                              # (N, T)
    lengths = mask.sum(1, keepdim=True)                                     # (N, 1) |o_i|
    old_logp = logp.detach() if old_logp is None else old_logp              # (N, T)
    token_log_ratio = torch.where(keep, logp - old_logp, 0.0)               # (N, T) log ρ, 0 where masked
    log_ratio = token_log_ratio                                             # (N, T)
    if importance_sampling_level == "sequence":
        log_ratio = token_log_ratio.sum(1, keepdim=True) / lengths.clamp(min=1)   # (N, 1) GSPO
    ratio = torch.exp(log_ratio)                                            # (N, T) or (N, 1)
    adv = advantages.to(logp.dtype)[:, None]                                # (N, 1) Â
    safe_logp = torch.where(keep, logp, 0.0)                                # (N, T) no -inf past the end
    is_ratio = None
    if rollout_is_cap is not None:
        if sampling_logp is None:
            raise ValueError("rollout_is_cap needs sampling_logp")
        is_ratio = torch.exp(torch.where(keep, old_logp - sampling_logp, 0.0)).clamp(max=rollout_is_cap).detach()
    log_w = None
    if loss_type == "vespo":                                                # (N, 1) Σ_t log ρ (+ log IS)
        log_w = (token_log_ratio.clamp(-20, 20) * mask).sum(1, keepdim=True)
        if is_ratio is not None:
            log_w = log_w + torch.where(keep, is_ratio.log().clamp(math.log(1e-8), 20.0), 0.0).sum(1, keepdim=True)
    per_token = term(ratio, adv, safe_logp, eps_low=epsilon_low, eps_high=epsilon_high, delta=delta,
                     sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                     log_w=log_w, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
                     vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    per_token = per_token.expand_as(logp)                                   # (N, T)
    kept_seq = None
    if off_policy_mask_threshold is not None:                               # DeepSeek-V3.2's OPSM
        sampler = old_logp if sampling_logp is None else sampling_logp      # TRL's fallback: π_old
        drift = torch.where(keep, sampler - logp.detach(), 0.0).sum(1, keepdim=True) / lengths.clamp(min=1)
        kept_seq = (adv >= 0) | (drift <= off_policy_mask_threshold)        # (N, 1)
        per_token = per_token * kept_seq
    if entropy_mask is None and top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs entropies or entropy_mask")
        if num_sequences is not None or num_tokens is not None or num_items is not None:
            raise ValueError("a micro-batch of a step (num_* given) needs the step's entropy_mask: a quantile "
                             "over this batch alone would change with the micro-batching")
        entropy_mask = high_entropy_mask(entropies.detach(), keep, top_entropy_quantile)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if is_ratio is not None and loss_type != "vespo":
        per_token = per_token * is_ratio
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        d = torch.where(keep, ref_logp - logp, 0.0)                         # (N, T) log π_ref/π_θ
        if kl_clamp is not None:
            d = d.clamp(-kl_clamp, kl_clamp)                                # (N, T) the authors' ±11
        kl = torch.exp(d) - d - 1                                           # (N, T) k3
        per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)

    masked = torch.where(keep, per_token, 0.0)                              # (N, T)
    S = logp.shape[0] if num_sequences is None else num_sequences
    if aggregation == "sequence mean":
        loss = (masked.sum(1) / lengths[:, 0].clamp(min=1)).sum() / max(S, 1)
    elif aggregation == "sequence sum":
        loss = masked.sum() / max(S, 1)
    elif aggregation == "token mean":
        loss = masked.sum() / (mask.sum().clamp(min=1) if num_tokens is None else max(num_tokens, 1))
    elif aggregation == "constant":
        if not max_completion_length or max_completion_length < 1:
            raise ValueError(f"{loss_type} needs max_completion_length >= 1, got {max_completion_length}")
        loss = masked.sum() / (max(S, 1) * max_completion_length)
    else:  # global tokens: num_items = 0 only when no rank has a completion token, and then the sum is 0 too
        loss = masked.sum() / (mask.sum().clamp(min=1) if num_items is None else (num_items if num_items > 0 else 1.0))
    if entropy_coef:
        if entropies is None:
            raise ValueError("entropy_coef needs entropies")
        acts = keep if entropy_mask is None else entropy_mask.bool() & keep
        if aggregation == "global tokens":                                  # TRL's: the loss's own normaliser
            n = mask.sum().clamp(min=1) if num_items is None else (num_items if num_items > 0 else 1.0)
        else:                                                               # the mean over the tokens it acts on
            n = acts.sum().clamp(min=1) if num_entropy_items is None else (num_entropy_items or 1.0)
        loss = loss - entropy_coef * torch.where(acts, entropies, 0.0).sum() / n

    with torch.no_grad():
        n = mask.sum().clamp(min=1)

        def mean(x):
            return ((x.expand_as(mask).to(mask.dtype) * mask).sum() / n).item()
        metrics = {
            "kl": mean(kl) if kl is not None else 0.0,
            "clip_low": mean((ratio < 1 - epsilon_low) & (adv < 0)),
            "clip_high": mean((ratio > (epsilon_high if loss_type == "cispo" else 1 + epsilon_high)) & (adv > 0)),
            "ratio": mean(ratio),
            "loss_per_token": mean(per_token),
            "tokens": mask.sum().item(),
        }
        if kept_seq is not None:
            metrics["off_policy_dropped"] = mean(~kept_seq)
        if entropy_mask is not None:
            metrics["entropy_kept"] = mean(entropy_mask.bool())
        if is_ratio is not None:
            metrics["rollout_is_ratio"] = mean(is_ratio)
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
