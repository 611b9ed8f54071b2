"""How sure a table's numbers are: intervals for an accuracy and for the difference of two models'
accuracies on the same questions, and an exact paired test. Pure Python (math only).

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
        φ = (ad - bc) / sqrt((a+b)(c+d)(a+c)(b+d))      (0 when a margin is 0)
        L = θ - sqrt((p_A - l1)² - 2φ (p_A - l1)(u2 - p_B) + (u2 - p_B)²)
        U = θ + sqrt((u1 - p_A)² - 2φ (u1 - p_A)(p_B - l2) + (p_B - l2)²)
Unpaired intervals (two independent samples) would be too wide here: the two models answer the same
questions, and most questions go the same way for both.
"""
import math

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
    phi = (a * d - b * c) / math.sqrt(margins) if margins else 0.0
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
