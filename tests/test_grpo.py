r"""The GRPO loss against values derived by hand.

Case A (used throughout): two completions of two tokens, π_old = 1 everywhere (old_logp = 0),
    logp = [[ln 1.5, 0], [0, ln 0.5]]  ->  ρ = [[1.5, 1], [1, 0.5]],   Â = [+1, -1],   ε = 0.2
    row 0 (Â = +1): t0 min(1.5, clip 1.2) = 1.2 -> ℓ = -1.2;   t1 min(1, 1) -> ℓ = -1
    row 1 (Â = -1): t0 min(-1, -1) -> ℓ = 1;   t1 min(-0.5, -0.8) = -0.8 -> ℓ = 0.8
    ℓ = [[-1.2, -1], [1, 0.8]]
  full mask:          grpo = mean(-1.1, 0.9) = -0.1;   bnpo = -0.4 / 4 = -0.1
  mask [[1,1],[1,0]]: grpo = mean(-1.1, 1) = -0.05;   bnpo = (-1.2 - 1 + 1) / 3 = -0.4
                      dr_grpo (L_max 4) = -1.2 / (2 * 4) = -0.15;   dapo (num_items 6) = -1.2 / 6 = -0.2
  clip fractions (full mask): high = ρ > 1.2 and Â > 0: token (0,0) -> 1/4; low = ρ < 0.8 and Â < 0: (1,1) -> 1/4
KL (k3): logp = 0, ref = ln 2 -> 2 - ln 2 - 1 = 0.306853; ref = -ln 2 -> 0.5 + ln 2 - 1 = 0.193147.
"""
import math

import pytest
import torch

from sbr.grpo import answer_likelihood, consistency_bonus, group_advantages, grpo_loss

LOGP = torch.tensor([[math.log(1.5), 0.0], [0.0, math.log(0.5)]], dtype=torch.float64)
OLD = torch.zeros(2, 2, dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
FULL = torch.ones(2, 2)
PART = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def test_group_advantages_by_hand():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> ±0.5 / (0.57735 + 1e-4)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)
    assert not torch.isnan(group_advantages(torch.zeros(8), 4)).any()        # equal rewards -> 0, not NaN
    assert torch.equal(group_advantages(torch.zeros(8), 4), torch.zeros(8))
    # "none" only centres; "batch" divides by the whole batch's std: std([1,0,0,1,1,1,1,1]) = 0.46291
    assert torch.allclose(group_advantages(r, 4, scale="none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    b = 0.5 / (0.4629100 + 1e-4)
    assert torch.allclose(group_advantages(r, 4, scale="batch"), torch.tensor([b, -b, -b, b, 0, 0, 0, 0]), atol=1e-5)
    with pytest.raises(ValueError):
        group_advantages(r, 3)
    with pytest.raises(ValueError):
        group_advantages(r, 1)


@pytest.mark.parametrize("loss_type, mask, kw, expected", [
    ("grpo", FULL, {}, -0.1),
    ("bnpo", FULL, {}, -0.1),
    ("grpo", PART, {}, -0.05),
    ("bnpo", PART, {}, -0.4),
    ("dr_grpo", PART, {"max_completion_length": 4}, -0.15),
    ("dapo", PART, {"num_items": 6}, -0.2),
    ("dapo", PART, {}, -0.4),                      # num_items defaults to the local token count
])
def test_loss_types_by_hand(loss_type, mask, kw, expected):
    loss, _ = grpo_loss(LOGP, OLD, None, ADV, mask, loss_type=loss_type, **kw)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_clip_fractions_and_metrics_by_hand():
    _, m = grpo_loss(LOGP, OLD, None, ADV, FULL)
    assert m["clip_high"] == pytest.approx(0.25) and m["clip_low"] == pytest.approx(0.25)
    assert m["ratio"] == pytest.approx((1.5 + 1 + 1 + 0.5) / 4)
    assert m["loss_per_token"] == pytest.approx(-0.1) and m["kl"] == 0.0 and m["tokens"] == 4


def test_k3_kl_by_hand():
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(2), -math.log(2)]], dtype=torch.float64)
    loss, m = grpo_loss(logp, None, ref, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2), beta=0.1)
    assert m["kl"] == pytest.approx((0.306853 + 0.193147) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * 0.25, abs=1e-6)               # Â = 0: only β·KL
    loss.backward()
    # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp): 1 - 2 = -1 and 1 - 0.5 = 0.5, times β / 2
    assert torch.allclose(logp.grad, torch.tensor([[-0.05, 0.025]], dtype=torch.float64))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, None, None, torch.zeros(1), torch.ones(1, 2), beta=0.1)


def test_ratio_one_and_beta_zero_is_reinforce():
    torch.manual_seed(0)
    logp = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(6, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    loss, m = grpo_loss(logp, None, None, adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    reinforce = -((adv[:, None] * logp * mask).sum(1) / mask.sum(1)).mean()
    (expected,) = torch.autograd.grad(reinforce, logp)
    assert torch.allclose(grad, expected) and m["ratio"] == pytest.approx(1.0)
    assert m["clip_low"] == 0 and m["clip_high"] == 0


def test_clipped_tokens_get_zero_gradient():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, OLD, None, ADV, FULL)
    loss.backward()
    # (0,0): ρ = 1.5 > 1.2 with Â > 0 and (1,1): ρ = 0.5 < 0.8 with Â < 0 are clipped; the others get -Â ρ / (|o| G)
    assert logp.grad[0, 0] == 0 and logp.grad[1, 1] == 0
    assert logp.grad[0, 1].item() == pytest.approx(-1 * 1 / 4) and logp.grad[1, 0].item() == pytest.approx(1 / 4)


def test_fully_masked_sequence_adds_nothing():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, _ = grpo_loss(LOGP, OLD, None, ADV, mask)
    assert loss.item() == pytest.approx(-1.1 / 2)                # the masked row counts 0 in the mean


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_no_nan_whatever_the_mask(loss_type):
    """Every completion masked (mask_truncated with all rows truncated), the normaliser 0 (dapo's
    num_items counted over a step with no tokens), and garbage at the masked positions (-inf, a
    reference 1e4 nats away): the loss is exactly 0 and every gradient finite (zero)."""
    logp = torch.tensor([[-1.0, float("-inf")], [-2.0, -3.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[1e4, 5.0], [-1e4, 1e4]], dtype=torch.float64)
    none = torch.zeros(2, 2)
    kw = {"max_completion_length": 2} if loss_type == "dr_grpo" else {"num_items": 0.0} if loss_type == "dapo" else {}
    for old, clamp in ((None, 11.0), (torch.zeros(2, 2, dtype=torch.float64), None)):
        loss, m = grpo_loss(logp, old, ref, ADV, none, beta=0.1, kl_clamp=clamp, loss_type=loss_type, **kw)
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss.item() == 0.0 and torch.isfinite(grad).all() and not grad.any()
        assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_masked_positions_never_change_the_loss_or_its_gradient(loss_type):
    """Row 1's second token is masked: whatever log-probs sit there, loss and gradient are those of a
    benign value (without clamp, e^(1e4) would be inf and 0 * inf NaN)."""
    kw = {"max_completion_length": 2} if loss_type == "dr_grpo" else {}
    out = []
    for junk in (0.0, -1e4, float("-inf")):
        logp = torch.tensor([[-1.0, -0.5], [-2.0, junk]], dtype=torch.float64, requires_grad=True)
        ref = torch.tensor([[-1.5, -0.2], [-1.0, -0.3]], dtype=torch.float64)
        loss, _ = grpo_loss(logp, None, ref, ADV, PART, beta=0.1, kl_clamp=None, loss_type=loss_type, **kw)
        out.append((loss.item(), torch.autograd.grad(loss, logp)[0]))
    for loss, grad in out[1:]:
        assert loss == out[0][0] and torch.equal(grad, out[0][1])


def test_kl_clamp_by_hand():
    """The authors' clamp, d = clamp(ref - logp, -11, 11): d = 20 -> e^11 - 11 - 1 = 59862.141715;
    d = -20 -> e^-11 + 11 - 1 = 10.0000167; d = 1 inside -> e - 2 = 0.718282. Beyond the clamp the
    KL term is flat, so those tokens get no KL gradient; inside it, d/dlogp = 1 - e^d."""
    logp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[20.0, -20.0, 1.0]], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    loss, m = grpo_loss(logp, None, ref, zero, torch.ones(1, 3), beta=1.0, loss_type="bnpo")
    assert m["kl"] == pytest.approx((59862.141715 + 10.0000167 + 0.718282) / 3, rel=1e-7)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 0] == 0 and grad[0, 1] == 0 and grad[0, 2].item() == pytest.approx((1 - math.e) / 3)
    _, m = grpo_loss(logp, None, ref, zero, torch.ones(1, 3), beta=1.0, kl_clamp=None, loss_type="bnpo")
    assert m["kl"] == pytest.approx((math.exp(20) - 21 + math.exp(-20) + 19 + math.e - 2) / 3)


def test_batch_scale_uses_the_rewards_of_every_rank():
    """scale="batch" divides by the std of `batch_rewards` (all ranks' rewards of the step, TRL's
    choice): here this rank's [1, 0, 0, 1] with another rank's [1, 1, 1, 1] -> std of all 8 = 0.46291."""
    mine, everyone = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    b = 0.5 / (0.4629100 + 1e-4)
    adv = group_advantages(mine, 4, scale="batch", batch_rewards=everyone)
    assert torch.allclose(adv, torch.tensor([b, -b, -b, b]), atol=1e-5)


@pytest.mark.slow
def test_batch_scale_over_two_ranks_equals_one_process():
    """Two ranks with [1, 0, 0, 1] and [1, 1, 1, 0]: each divides by the unbiased std of all 8 rewards,
    sqrt((5 · 0.375² + 3 · 0.625²) / 7) = 0.517549, as one process holding both groups does; a rank's
    own std (0.57735, 0.5) would not."""
    import json, os, subprocess, sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
           "tests/rank_advantages.py"]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    one = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0]), 4, scale="batch")
    assert torch.allclose(torch.tensor(ranks[0] + ranks[1]), one, atol=1e-6)
    assert ranks[0][0] == pytest.approx(0.5 / (0.517549 + 1e-4), rel=1e-5)


def test_consistency_bonus_by_hand():
    """GRPO-CARE, two groups of 4, λ = 0.5. Group 1: correct 0, 1, 2 with likelihoods 0.9, 0.5, 0.7,
    mean 0.7: 0 (0.9) and 2 (0.7 >= 0.7) earn 0.5, 1 (0.5) does not; 3 is wrong (its 0.95 is never
    compared). With margin 0.2 the bar drops to 0.5 and 1 earns it too. Group 2: nobody correct, no
    bonus (no NaN from an empty mean)."""
    acc = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    c = torch.tensor([0.9, 0.5, 0.7, 0.95, 0.9, 0.9, 0.9, 0.9])
    assert consistency_bonus(acc, c, 4).tolist() == [0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert consistency_bonus(acc, c, 4, margin=0.2).tolist() == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert consistency_bonus(acc, c, 4, coefficient=1.0).tolist()[:4] == [1.0, 0.0, 1.0, 0.0]
    one = consistency_bonus(torch.tensor([0.0, 1.0]), torch.tensor([0.1, 0.2]), 2)   # a lone correct one: its own mean
    assert one.tolist() == [0.0, 0.5]


def test_answer_likelihood_by_hand():
    """Row 0: answer tokens with π_ref 0.8 and 0.2: exp(mean log) = sqrt(0.16) = 0.4. Row 1: 0.99 alone,
    capped at 0.95. Row 2: no answer tokens: the cap (exp 0 = 1, capped)."""
    p = torch.tensor([[0.5, 0.8, 0.2], [0.3, 0.99, 0.3], [0.3, 0.3, 0.3]])
    m = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 0, 0]])
    assert answer_likelihood(p.log(), m).tolist() == pytest.approx([0.4, 0.95, 0.95])
    assert answer_likelihood(p.log(), m, cap=1.0)[1].item() == pytest.approx(0.99)
