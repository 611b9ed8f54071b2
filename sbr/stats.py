"""How sure a table's numbers are: intervals for an accuracy and for the difference of two models'
accuracies on the same questions, and an exact paired test; for runs pooled over seeds, a test and
an interval that resample questions, not (seed, question) pairs. Python and numpy.

One model, k of n questions right: the Wilson score interval (Wilson 1927), which stays inside [0, 1]
and keeps its coverage near 95% for small n or accuracies near 0 and 1, unlike p ± 1.96 sqrt(p(1-p)/n):
    centre = (p + z²/2n) / (1 + z²/n),   half = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)

Two models A and B on the same n questions, as a paired 2x2 table: a both right, b only A right,
c only B right, d both wrong. The difference is θ = p_A - p_B = (b - c) / n; only the discordant
questions (b + c) carry information about it, so the test and the interval are paired:
  - exact McNemar test: under "no difference" each discordant question is A's or B's with probability
    1/2, so p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2);
  - Newcombe's method 10 interval (Newcombe 1998, "Improved confidence intervals for the difference
    between binomial proportions based on paired data", Stat. Med. 17:2635): the Wilson intervals
    (l1, u1) of p_A and (l2, u2) of p_B combined with the correlation φ of the paired outcomes,
        φ = N / sqrt((a+b)(c+d)(a+c)(b+d))      (0 when a margin is 0), with the published continuity
        correction N = max(ad - bc - n/2, 0) when ad > bc, else N = ad - bc (Newcombe 1998; Altman et
        al., "Statistics with Confidence", 2nd ed., p. 52); without it identical answers (50, 0, 0, 50)
        give the zero-width [0, 0], and at n = 240 with 1 question in 200 discordant the interval
        covered the true difference 70% of the time instead of 95% (tests/test_stats.py)
        L = θ - sqrt((p_A - l1)² - 2φ (p_A - l1)(u2 - p_B) + (u2 - p_B)²)
        U = θ + sqrt((u1 - p_A)² - 2φ (u1 - p_A)(p_B - l2) + (p_B - l2)²)
Unpaired intervals (two independent samples) would be too wide here: the two models answer the same
questions, and most questions go the same way for both.

Two methods pooled over seeds (each a model trained with seeds 1..S, all evaluated on the same
questions): every question appears once a seed, so the S pairs of a question are not independent, and
counting them as S questions (McNemar, Newcombe) overstates the evidence (S identical seeds would make
any difference "significant"). `clustered_difference` keeps each question whole: θ is the mean over all
(seed, question) pairs; its interval a paired bootstrap that resamples questions with all their seeds;
its p a sign-flip test over questions (under "no difference" the two methods' labels are exchangeable
within a question, so each question's summed difference is as likely positive as negative). It measures
the questions' noise given these trained models, seeds included, not how the methods would fare with
other seeds (the seed-by-seed table shows that).
"""
import math

import numpy as np

Z95 = 1.959963984540054            # the 97.5% point of the standard normal


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials, as fractions."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else centre - half, 1.0 if k == n else centre + half)    # exact at the ends


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of b vs c discordant pairs (1.0 when there are none)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def paired_difference(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float, float]:
    """θ = p_A - p_B and its Newcombe method-10 interval, as fractions, from the paired table
    (a both right, b only A, c only B, d both wrong)."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    if cross > 0:
        cross = max(cross - n / 2, 0.0)                       # the continuity correction of φ
    phi = cross / math.sqrt(margins) if margins else 0.0
    theta = p1 - p2
    lower = theta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = theta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return theta, max(-1.0, lower), min(1.0, upper)


def paired_table(right_a: dict, right_b: dict) -> tuple[int, int, int, int]:
    """(a, b, c, d) from two {question key: right?} maps over the same questions."""
    if right_a.keys() != right_b.keys():
        raise ValueError(f"not the same questions: {len(right_a.keys() - right_b.keys())} only in the first, "
                         f"{len(right_b.keys() - right_a.keys())} only in the second")
    a = b = c = d = 0
    for k, x in right_a.items():
        y = right_b[k]
        a, b, c, d = a + (x and y), b + (x and not y), c + (y and not x), d + (not x and not y)
    return a, b, c, d


def clustered_difference(pairs: dict, reps: int = 4000, seed: int = 0, exact_up_to: int = 16,
                         z: float = Z95) -> tuple[float, float, float, float]:
    """pairs {question: [(A right?, B right?), one a seed]} -> (θ = mean of A - B over every pair, the 95%
    percentile interval of a bootstrap resampling questions with all their seeds (`reps` resamples,
    seeded), the two-sided sign-flip p over questions: exact over every sign pattern when at most
    `exact_up_to` questions differ in sum, else `reps` random patterns, counted with the observed one:
    p = (1 + #{|flipped| >= |observed|}) / (reps + 1), never 0, at least 1 / (reps + 1); Phipson & Smyth
    2010, "Permutation p-values should never be zero")."""
    sums = np.array([sum(int(a) - int(b) for a, b in v) for v in pairs.values()], dtype=np.int64)
    counts = np.array([len(v) for v in pairs.values()], dtype=np.int64)
    theta = sums.sum() / counts.sum()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sums), size=(reps, len(sums)))
    boot = sums[pick].sum(1) / counts[pick].sum(1)
    tail = (1 - math.erf(z / math.sqrt(2))) / 2                     # 0.025 for z = 1.96
    lo, hi = np.quantile(boot, [tail, 1 - tail])
    nz = sums[sums != 0]
    exact = len(nz) <= exact_up_to                                  # every pattern, the observed one included
    signs = (1 - 2 * ((np.arange(2 ** len(nz))[:, None] >> np.arange(len(nz))) & 1) if exact
             else rng.choice([-1, 1], size=(reps, len(nz))))
    extreme = int(np.sum(np.abs(signs @ nz) >= abs(nz.sum())))
    p = extreme / len(signs) if exact else (1 + extreme) / (reps + 1)
    return float(theta), float(min(lo, theta)), float(max(hi, theta)), p
