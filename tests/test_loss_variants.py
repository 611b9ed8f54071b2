r"""The loss variants of sbr/grpo.py against hand-derived values (Case A of tests/test_grpo.py) and
against TRL's formulas on random tensors, and micro-batching never changing any of them.

Case A: logp = [[ln 1.5, 0], [0, ln 0.5]], old_logp = 0 -> ρ = [[1.5, 1], [1, 0.5]], Â = [+1, -1], ε = 0.2.
  GSPO (sequence ratio): ρ_0 = exp(ln 1.5 / 2) = 1.224745 -> clipped to 1.2, ℓ = -1.2 on both tokens;
      ρ_1 = exp(ln 0.5 / 2) = 0.707107 -> min(-0.7071, -0.8) = -0.8, ℓ = 0.8; grpo = mean(-1.2, 0.8) = -0.2,
      and no gradient (both clipped). luspo: (2 x -1.2 + 2 x 0.8) / 2 = -0.4.
  cispo (cap ε_high = 5): ℓ = -sg(ρ) Â log π: row 0 [-1.5 ln 1.5, 0], row 1 [0, 0.5 ln 0.5];
      sum -0.954771 / 4 tokens = -0.238693; d/dlogp = -sg(min(ρ, cap)) Â / 4 = [[-0.375, -0.25], [0.25, 0.125]];
      cap 1.2: d/dlogp[0, 0] = -0.3.
  sapo (τ+ = 1, τ- = 1.05): ℓ = -(4/τ) σ(τ (ρ - 1)) Â: row 0 [-4 σ(0.5), -2] = [-2.489834, -2];
      row 1 [(4/1.05) σ(0), (4/1.05) σ(-0.525)] = [1.904762, 1.415946]; grpo = mean(-2.244917, 1.660354) = -0.292282.
  delta: logp = [[ln 1.5, ln 3]], Â = -1, δ = 1.4: token 1: min(-min(3, 1.4), -1.2) = -1.4 -> ℓ = 1.4
      (3 without δ); token 0: min(-1.4, -1.2) = -1.4 -> 1.4 (1.5 without); both flat in log π.
  vespo (k+ 2, λ+ 3, k- 3, λ- 2): w_0 = 1.5 (Σ log ρ = ln 1.5), φ = e^3 1.5^2 e^-4.5 = 0.502043;
      w_1 = 0.5, φ = e^2 0.5^3 e^-1 = 0.339785; ℓ = -φ Â log π: [-0.502043 ln 1.5, 0], [0, 0.339785 ln 0.5];
      sum = -0.203562 - 0.235520 = -0.439082, / 4 = -0.109771.
"""
import math

import pytest
import torch

from sbr.grpo import LOSS_TYPES, grpo_loss, high_entropy_mask

LOGP = torch.tensor([[math.log(1.5), 0.0], [0.0, math.log(0.5)]], dtype=torch.float64)
OLD = torch.zeros(2, 2, dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
FULL = torch.ones(2, 2)


def loss_and_grad(logp=LOGP, adv=ADV, mask=FULL, **kw):
    logp = logp.clone().requires_grad_(True)
    loss, m = grpo_loss(logp, OLD[: logp.shape[0], : logp.shape[1]], kw.pop("ref", None), adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), grad, m


def test_gspo_sequence_ratio_by_hand():
    loss, grad, m = loss_and_grad(importance_sampling_level="sequence")
    assert loss == pytest.approx(-0.2, abs=1e-12) and not grad.any()
    assert m["ratio"] == pytest.approx((2 * math.sqrt(1.5) + 2 * math.sqrt(0.5)) / 4)
    assert loss_and_grad(importance_sampling_level="sequence", loss_type="luspo")[0] == pytest.approx(-0.4, abs=1e-12)


def test_cispo_by_hand():
    loss, grad, m = loss_and_grad(loss_type="cispo", epsilon_high=5.0)
    assert loss == pytest.approx((-1.5 * math.log(1.5) + 0.5 * math.log(0.5)) / 4, abs=1e-12)
    assert torch.allclose(grad, torch.tensor([[-0.375, -0.25], [0.25, 0.125]], dtype=torch.float64))
    _, grad, m = loss_and_grad(loss_type="cispo", epsilon_high=1.2)
    assert grad[0, 0].item() == pytest.approx(-0.3) and m["clip_high"] == pytest.approx(0.25)


def test_sapo_by_hand():
    sig = lambda x: 1 / (1 + math.exp(-x))                                      # noqa: E731
    row0 = (-4 * sig(0.5) - 2) / 2
    row1 = (4 / 1.05 * 0.5 + 4 / 1.05 * sig(1.05 * -0.5)) / 2
    loss, grad, _ = loss_and_grad(loss_type="sapo")
    assert loss == pytest.approx((row0 + row1) / 2, abs=1e-12)
    # d/dlogp -(4/τ) σ(τ(ρ-1)) Â = -4 σ'(τ(ρ-1)) ρ Â, per-sequence mean over 2 tokens, mean over 2 sequences
    assert grad[0, 0].item() == pytest.approx(-4 * sig(0.5) * (1 - sig(0.5)) * 1.5 / 4)


def test_two_sided_clipping_by_hand():
    logp = torch.tensor([[math.log(1.5), math.log(3.0)]], dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    kw = dict(loss_type="bnpo", mask=torch.ones(1, 2), adv=adv, logp=logp)
    assert loss_and_grad(**kw)[0] == pytest.approx((1.5 + 3.0) / 2)
    loss, grad, _ = loss_and_grad(delta=1.4, **kw)
    assert loss == pytest.approx(1.4) and not grad.any()                        # both capped at δ: flat


def test_vespo_by_hand():
    phi = lambda w, k, lam: math.exp(lam + k * math.log(w) - lam * w)           # noqa: E731
    p0, p1 = phi(1.5, 2, 3), phi(0.5, 3, 2)
    assert (p0, p1) == (pytest.approx(0.502043, abs=1e-6), pytest.approx(0.339785, abs=1e-6))
    loss, grad, _ = loss_and_grad(loss_type="vespo")
    assert loss == pytest.approx((-p0 * math.log(1.5) + p1 * math.log(0.5)) / 4, abs=1e-12)
    assert torch.allclose(grad, torch.tensor([[-p0, -p0], [p1, p1]], dtype=torch.float64) / 4)   # φ is a weight only


def test_bias_corrected_kl_off_policy_mask_entropy_mask_and_rollout_is_by_hand():
    ref = torch.zeros(2, 2, dtype=torch.float64)                                # KL_t = e^-logp + logp - 1
    kl = (torch.exp(-LOGP) + LOGP - 1)
    plain, _, _ = loss_and_grad(loss_type="bnpo", beta=1.0, ref=ref, kl_clamp=None)
    corrected, _, _ = loss_and_grad(loss_type="bnpo", beta=1.0, ref=ref, kl_clamp=None, use_bias_correction_kl=True)
    rho = torch.exp(LOGP)
    assert corrected - plain == pytest.approx(((kl * rho).sum() - kl.sum()).item() / 4, abs=1e-12)
    # OPSM: row 1 (Â < 0) drifted by mean(sampling - logp) = (1 - ln 0.5 + 0) / 2 > 0.5: dropped; row 0 (Â > 0) kept
    sampling = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    loss, _, m = loss_and_grad(loss_type="bnpo", off_policy_mask_threshold=0.5, sampling_logp=sampling)
    assert loss == pytest.approx((-1.2 - 1) / 4) and m["off_policy_dropped"] == pytest.approx(0.5)
    # top 25% of entropies: only token (1, 1) (entropy 4) carries the policy term: ℓ = 0.8
    H = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert high_entropy_mask(H, FULL, 0.25).tolist() == [[False, False], [False, True]]
    loss, _, m = loss_and_grad(loss_type="bnpo", top_entropy_quantile=0.25, entropies=H)
    assert loss == pytest.approx(0.8 / 4) and m["entropy_kept"] == 0.25
    # rollout IS: π_old/π_sample = e^(0 - sampling), capped at 2: row 1 token 0 gets e^-1
    loss, _, m = loss_and_grad(loss_type="bnpo", rollout_is_cap=2.0, sampling_logp=sampling)
    assert loss == pytest.approx((-1.2 - 1 + math.exp(-1) + 0.8) / 4)
    # entropy bonus: -c mean H over the kept tokens, its gradient on the entropies only
    H = H.clone().requires_grad_(True)
    loss, _ = grpo_loss(LOGP, OLD, None, ADV, FULL, loss_type="bnpo", entropies=H, entropy_coef=0.1)
    (g,) = torch.autograd.grad(loss, H)
    assert loss.item() == pytest.approx(-0.1 - 0.1 * 2.5) and torch.allclose(g, torch.full((2, 2), -0.025, dtype=torch.float64))


# ---------------------------------------------------------------------------- against TRL's formulas
def trl(logp, old, ref, adv, mask, *, loss_type, eps_low=0.2, eps_high=0.2, delta=None, beta=0.0, bias_kl=False,
        level="token", entropies=None, top_q=1.0, opsm=None, sampling=None, is_cap=None, entropy_coef=0.0, L=None):
    """TRL's GRPOTrainer._compute_loss for one process and one micro-batch, rewritten from its formulas
    (huggingface/trl trl/trainer/grpo_trainer.py at f2cd577, get_gamma_weights, get_off_policy_mask,
    get_high_entropy_mask), with vespo's default k/λ and sapo's default temperatures."""
    adv = adv[:, None]
    log_ratio = logp - old
    log_w = log_ratio if level == "token" else ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    c1 = torch.exp(log_w)
    is_ratio = None if is_cap is None else torch.exp((old - sampling) * mask).clamp(max=is_cap)
    kl = torch.exp(ref - logp) - (ref - logp) - 1 if beta else None
    if beta and bias_kl:
        kl = kl * c1
    if loss_type == "cispo":
        per = -c1.clamp(max=eps_high).detach() * adv * logp
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, adv.new_tensor(1.0), adv.new_tensor(1.05))
        per = -torch.sigmoid(tau * (c1 - 1)) * 4 / tau * adv
    elif loss_type == "vespo":
        with torch.no_grad():
            s = (log_ratio.clamp(-20, 20) * mask).sum(-1, keepdim=True)
            if is_ratio is not None:
                s = s + is_ratio.log().clamp(math.log(1e-8), 20.0).sum(-1, keepdim=True)
            lw = s.clamp(math.log(1e-8), 20.0)
            k = torch.where(adv >= 0, adv.new_tensor(2.0), adv.new_tensor(3.0))
            lam = torch.where(adv >= 0, adv.new_tensor(3.0), adv.new_tensor(2.0))
            phi = torch.exp(lam + k * lw - lam * lw.exp())
        per = -phi * adv * logp
    else:
        c2 = c1.clamp(1 - eps_low, 1 + eps_high)
        first = c1 if delta is None else c1.clamp(max=delta)
        per = -torch.min(first * adv, c2 * adv)
    if opsm is not None:
        drift = ((sampling - logp.detach()) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        per = per * ((adv >= 0) | (drift <= opsm))
    emask = None
    if top_q < 1.0:
        emask = (entropies * mask >= torch.quantile(entropies[mask.bool()], 1 - top_q)) & mask.bool()
        per = per * emask
    if is_ratio is not None and loss_type != "vespo":
        per = per * is_ratio
    if beta:
        per = per + beta * kl
    if loss_type in ("grpo", "sapo"):
        loss = ((per * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per * mask).sum() / (per.size(0) * L)
    elif loss_type == "luspo":
        loss = (per * mask.sum(1, keepdim=True)).mean()
    else:
        loss = (per * mask).sum() / mask.sum().clamp(min=1.0)
    if entropy_coef:
        eff = mask if emask is None else mask * emask
        if loss_type in ("cispo", "dapo", "vespo"):          # TRL: the global token count, not the kept tokens
            loss = loss - entropy_coef * (entropies * eff).sum() / mask.sum().clamp(min=1.0)
        else:
            loss = loss - entropy_coef * (entropies * eff).sum() / eff.sum().clamp(min=1.0)
    return loss


SWITCHES = [{}, {"delta": 1.3}, {"beta": 0.1, "bias_kl": True}, {"level": "sequence"}, {"top_q": 0.4},
            {"opsm": 0.05}, {"is_cap": 1.5}, {"entropy_coef": 0.01}, {"top_q": 0.4, "entropy_coef": 0.01}]


def ours(logp, old, ref, adv, mask, *, loss_type, delta=None, beta=0.0, bias_kl=False, level="token",
         entropies=None, top_q=1.0, opsm=None, sampling=None, is_cap=None, entropy_coef=0.0, L=None):
    return grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, delta=delta, beta=beta, kl_clamp=None,
                     use_bias_correction_kl=bias_kl, importance_sampling_level=level, entropies=entropies,
                     top_entropy_quantile=top_q, off_policy_mask_threshold=opsm, sampling_logp=sampling,
                     rollout_is_cap=is_cap, entropy_coef=entropy_coef, max_completion_length=L)[0]


TRL_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")   # TRL's loss types


def test_every_trl_loss_type_is_here():
    assert set(TRL_TYPES) <= set(LOSS_TYPES)


@pytest.mark.parametrize("loss_type", TRL_TYPES)
def test_equal_to_trls_loss_and_gradient(loss_type):
    """Random tensors, every mask row non-empty (TRL does not zero masked positions before its exps), each
    switch alone: loss and gradient (log-probs and entropies) equal TRL's. luspo is compared where TRL's
    is well defined: per-sequence terms (sequence-level ratio, no per-token KL, entropy mask or IS)."""
    torch.manual_seed(len(loss_type))
    N, T = 6, 5
    logp = (-torch.rand(N, T, dtype=torch.float64) * 2)
    old = logp + 0.3 * torch.randn(N, T, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(N, T, dtype=torch.float64)
    sampling = old + 0.1 * torch.randn(N, T, dtype=torch.float64)
    adv = torch.randn(N, dtype=torch.float64)
    mask = (torch.rand(N, T) > 0.3).double()
    mask[:, 0] = 1
    H = torch.rand(N, T, dtype=torch.float64) * 3
    for switch in SWITCHES:
        if loss_type == "luspo" and set(switch) - {"level", "delta", "opsm"}:
            continue
        kw = dict(loss_type=loss_type, L=T, sampling=sampling if {"opsm", "is_cap"} & set(switch) else None, **switch)
        if loss_type == "luspo":
            kw["level"] = "sequence"
        results = []
        for fn in (trl, ours):
            x, h = logp.clone().requires_grad_(True), H.clone().requires_grad_(True)
            loss = fn(x, old, ref, adv, mask, entropies=h, **kw)
            results.append((loss.item(), *torch.autograd.grad(loss, (x, h), allow_unused=True, materialize_grads=True)))
        (a, ga, ha), (b, gb, hb) = results
        assert b == pytest.approx(a, rel=1e-10, abs=1e-12), switch
        assert torch.allclose(ga * mask, gb, atol=1e-12) and torch.allclose(ha * mask, hb, atol=1e-12), switch


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_micro_batches_sum_to_the_whole_step(loss_type):
    """Rows split 2 + 4 with the step's counts passed: the two losses and gradients sum to the one
    call's, for every loss type and with the entropy bonus over a step-wide entropy mask."""
    torch.manual_seed(1)
    N, T = 6, 5
    logp = (-torch.rand(N, T, dtype=torch.float64) * 2).requires_grad_(True)
    old = logp.detach() + 0.2 * torch.randn(N, T, dtype=torch.float64)
    adv = torch.randn(N, dtype=torch.float64)
    mask = (torch.rand(N, T) > 0.3).double()
    mask[:, 0] = 1
    H = torch.rand(N, T, dtype=torch.float64, requires_grad=True)
    emask = high_entropy_mask(H.detach(), mask, 0.5)
    kw = dict(loss_type=loss_type, max_completion_length=T, entropy_coef=0.01,
              importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    whole, _ = grpo_loss(logp, old, None, adv, mask, entropies=H, entropy_mask=emask, **kw)
    counts = dict(num_sequences=N, num_tokens=mask.sum().item(), num_items=mask.sum().item(),
                  num_entropy_items=emask.sum().item())
    parts = sum(grpo_loss(logp[r], old[r], None, adv[r], mask[r], entropies=H[r], entropy_mask=emask[r], **kw, **counts)[0]
                for r in (slice(0, 2), slice(2, N)))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)
    g1, g2 = torch.autograd.grad(whole, (logp, H)), torch.autograd.grad(parts, (logp, H))
    assert all(torch.allclose(a, b, atol=1e-14) for a, b in zip(g1, g2))
