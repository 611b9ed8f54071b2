r"""Intervals and paired tests (sbr/stats.py), against values derived by hand, and `evaluate.py --compare`.

The running example: two models on the same 100 questions, A right on 46, B on 50; 40 both right, 6
only A, 10 only B, 44 both wrong.
  Wilson, A: p = 0.46, z² = 3.841459, z²/n = 0.0384146, centre = (0.46 + 0.0192073) / 1.0384146 = 0.461484,
        half = (1.959964 / 1.0384146) sqrt(0.46 x 0.54 / 100 + 3.841459 / 40000) = 1.887458 x 0.050794
        = 0.095873  ->  [36.56%, 55.74%];  B (0.50): [40.38%, 59.62%]
  McNemar: 16 discordant, min(6, 10) = 6: p = 2 (C(16,0) + ... + C(16,6)) / 2^16
        = 2 (1 + 16 + 120 + 560 + 1820 + 4368 + 8008) / 65536 = 2 x 14893 / 65536 = 0.454498
  Newcombe 10, θ = p_A - p_B = -0.04: ad - bc = 40 x 44 - 6 x 10 = 1700 > 0, corrected to 1700 - 100/2
        = 1650; φ = 1650 / sqrt(46 x 54 x 50 x 50) = 1650 / 2491.987 = 0.662122; with p_A - l1 = 0.094392,
        u1 - p_A = 0.097351, p_B - l2 = u2 - p_B = 0.096168:
        δ² = 0.094392² - 2 φ 0.094392 x 0.096168 + 0.096168² = 0.0089098 - 0.0120209 + 0.0092484 = 0.0061373
        ε² = 0.097351² - 2 φ 0.097351 x 0.096168 + 0.096168² = 0.0094773 - 0.0123978 + 0.0092484 = 0.0063279
        -> [-0.04 - 0.078342, -0.04 + 0.079548] = [-11.83, +3.95] points
  Identical answers (50, 0, 0, 50): ad - bc = 2500 -> 2450, φ = 2450 / 2500 = 0.98, both half-widths
        0.096168: δ² = 2 x 0.096168² x (1 - 0.98) -> δ = 0.019234: [-1.92, +1.92] points, not [0, 0].
"""
import json
import os
import subprocess
import sys

import pytest

from sbr.stats import mcnemar_exact, paired_difference, paired_table, wilson


def test_wilson_by_hand():
    lo, hi = wilson(46, 100)
    assert (round(100 * lo, 2), round(100 * hi, 2)) == (36.56, 55.74)
    assert [round(100 * x, 2) for x in wilson(50, 100)] == [40.38, 59.62]
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and 0 < wilson(0, 10)[1] < 0.35


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(6, 10) == pytest.approx(2 * 14893 / 65536, abs=1e-12)
    assert mcnemar_exact(10, 6) == mcnemar_exact(6, 10)
    assert mcnemar_exact(0, 12) == pytest.approx(2 / 4096)          # 2 x C(12, 0) / 2^12
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_newcombe_paired_interval_by_hand():
    theta, lo, hi = paired_difference(40, 6, 10, 44)
    assert theta == pytest.approx(-0.04)
    assert (round(100 * lo, 2), round(100 * hi, 2)) == (-11.83, 3.95)
    assert paired_difference(40, 10, 6, 44) == pytest.approx((0.04, -hi, -lo))       # swapping the runs
    same = paired_difference(50, 0, 0, 50)                                         # identical answers
    assert same[0] == 0 and (round(100 * same[1], 2), round(100 * same[2], 2)) == (-1.92, 1.92)
    assert paired_table({"1": True, "2": True, "3": False, "4": False}, {"1": True, "2": False, "3": True, "4": False}) \
        == (1, 1, 1, 1)


def test_newcombe_interval_covers_when_discordance_is_rare():
    """n = 240 questions, A alone right on each with probability 1/200, B never alone: the true difference
    is +0.5 points. 1,000 simulated tables: the corrected interval covers it at least 95% of the time
    (99.97% in a 3,000-table run); without the correction of φ it covered 70%."""
    import random
    rng, n, covered = random.Random(0), 240, 0
    for _ in range(1000):
        b = sum(rng.random() < 0.005 for _ in range(n))
        a = sum(rng.random() < 0.5 for _ in range(n - b))
        _, lo, hi = paired_difference(a, b, 0, n - a - b)
        covered += lo <= 0.005 <= hi
    assert covered >= 950


def write_run(folder, correct_by_split, data_hash="abc", domains=None, table=None):
    """An evaluation folder as evaluate.py leaves it: results.json (with `table`, its accuracies by
    column, when given) and predictions_<split>.jsonl."""
    os.makedirs(folder, exist_ok=True)
    for split, correct in correct_by_split.items():
        with open(os.path.join(folder, f"predictions_{split}.jsonl"), "w") as f:
            for i, c in enumerate(correct):
                f.write(json.dumps({"sample_id": f"{split}-{i}", "correct": c, "extracted": "A",
                                    "domain": (domains or {}).get(split, [None] * len(correct))[i]}) + "\n")
    identity = {"data": {split: data_hash for split in correct_by_split}}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"benchmark": "seedbench", "table": table or {}, "provenance": {"identity": identity}}, f)
    return str(folder)


def test_compare_prints_paired_differences(tmp_path, capsys):
    """L1 is the running example (B - A = +4.00, [-3.95, +11.83], p = 0.454); on L2 B gains 12
    questions and loses none (p = 2 / 4096: significant)."""
    import evaluate
    l1_a = [True] * 40 + [True] * 6 + [False] * 10 + [False] * 44
    l1_b = [True] * 40 + [False] * 6 + [True] * 10 + [False] * 44
    l2_a = [True] * 20 + [False] * 12 + [False] * 18
    l2_b = [True] * 20 + [True] * 12 + [False] * 18
    a = write_run(tmp_path / "A", {"L1": l1_a, "L2": l2_a})
    b = write_run(tmp_path / "B", {"L1": l1_b, "L2": l2_b})
    evaluate.main(evaluate.Config(compare=[a, b]))
    out = capsys.readouterr().out
    assert "| L1 | 100 | 46.00 | 50.00 | +4.00 | -3.95 to +11.83 | 0.454 |" in out
    assert "| L2 | 50 | 40.00 | 64.00 | +24.00 * |" in out and "| 0.000488 |" in out
    assert "| L3 overall | 0 | - |" in out


def test_compare_refuses_runs_on_other_questions(tmp_path):
    import evaluate
    from sbr.common import ConfigError, UserError
    a = write_run(tmp_path / "A", {"L1": [True, False, True]})
    b = write_run(tmp_path / "B", {"L1": [True, False]})
    with pytest.raises(UserError, match=r"L1: not the same questions \(1 only in .*: compare on the common "
                                        r"questions with --compare_common true"):
        evaluate.main(evaluate.Config(compare=[a, b]))
    text = evaluate.main(evaluate.Config(compare=[a, b], compare_common=True))["comparison"]
    assert "| L1 | 2 | 50.00 | 50.00 | +0.00 |" in text
    with pytest.raises(ValueError, match="other annotation files"):
        evaluate.main(evaluate.Config(compare=[a, write_run(tmp_path / "C", {"L1": [True] * 3}, data_hash="xyz")]))
    with pytest.raises(ConfigError, match="--compare"):
        evaluate.main(evaluate.Config(compare=[a, str(tmp_path / "missing")]))


def test_every_cell_carries_its_wilson_interval():
    from sbr.results import markdown, seedbench_table
    rows = [{"correct": i < 46, "extracted": "A"} for i in range(100)]
    table = seedbench_table({"L1": rows})
    assert [round(x, 2) for x in table["L1"]["ci95"]] == [36.56, 55.74] and table["L2"]["ci95"] is None
    assert "| 95% interval (Wilson) | 36.6-55.7 | - |" in markdown(table, "m")


def test_seeds_pool_into_one_paired_table_and_a_mean_std_table(tmp_path):
    """Two seeds of the same 100 L1 questions, both the running example (B - A: 6 lost, 10 won). Pooled
    as 200 independent pairs, McNemar would say 12 vs 20 discordant, p = 2 P(X <= 12), X ~ Bin(32, 1/2)
    = 0.215: the second seed, identical, halving p. Kept whole by question: 16 questions differ, 6 by -2
    and 10 by +2; over the 2^16 sign patterns |Σ| >= 8 when at most 6 or at least 10 are +:
    p = 2 x 14893 / 65536 = 0.454, the one-seed test's. Means: A 46.0 ± 0.0, B 50.0 ± 0.0; with seed 1's
    B at 54 instead (4 more won), B is 52.0 ± 2.8 (sample std of 50 and 54 = sqrt(8)); one seed: no ±."""
    import math
    from sbr.results import paired_comparison, seeds_table
    l1_a = [True] * 46 + [False] * 54
    l1_b = [True] * 40 + [False] * 6 + [True] * 10 + [False] * 44
    def run(name, s, correct, acc):        # the paired test reads the predictions, the means the table
        return write_run(tmp_path / f"{name}{s}", {"L1": correct}, data_hash=f"h{s}",
                         table={"L1": {"accuracy": acc}, "L2": {"accuracy": None}})
    a = [run("A", s, l1_a, acc) for s, acc in ((0, 46.0), (1, 46.0))]
    b = [run("B", s, l1_b, acc) for s, acc in ((0, 50.0), (1, 54.0))]
    text = paired_comparison([a, b], ["A", "B"])
    p = 2 * 14893 / 65536
    assert "| L1 | 200 | 46.00 | 50.00 | +4.00 |" in text and f"| {p:.3g} |" in text and "sign-flip" in text
    assert f"| {2 * sum(math.comb(32, i) for i in range(13)) / 2 ** 32:.3g} |" not in text     # not McNemar's 0.215
    lo, hi = (float(x) for x in text.split("| +4.00 | ")[1].split(" |")[0].split(" to "))
    assert lo < 0 < 4 < hi                                         # as wide as one seed's: no extra evidence
    script = f"from sbr.results import paired_comparison; print(paired_comparison([{a!r}, {b!r}], ['A', 'B']))"
    again = {seed: subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert again["1"] == again["2"] == text + "\n"            # seeded: the same interval in every process
    table = seeds_table({"A": a, "B": b})
    assert "| A (2 seeds) | 46.0 ± 0.0 | - |" in table and "| B (2 seeds) | 52.0 ± 2.8 | - |" in table
    assert "| A (1 seed) | 46.0 | - |" in seeds_table({"A": a[:1]})


def test_clustered_difference_by_hand():
    """20 seeds of 2 questions: B right and A wrong on question 1 in every seed, both alike on question 2.
    Pooled as 40 pairs McNemar gives p = 2 / 2^20; over questions one question differs, its sign either
    way: p = 1 (one question is no evidence). Three questions summing +2, +1, 0: patterns ±2 ±1, |Σ| >= 3
    in 2 of 4: p = 0.5. Random patterns count the observed one (Phipson & Smyth 2010)."""
    from sbr.stats import clustered_difference
    theta, lo, hi, p = clustered_difference({"q1": [(True, False)] * 20, "q2": [(True, True)] * 20})
    assert theta == 0.5 and p == 1.0 and mcnemar_exact(20, 0) < 1e-5 and lo <= 0.5 <= hi
    assert clustered_difference({"a": [(1, 0), (1, 0)], "b": [(1, 0), (0, 0)], "c": [(0, 0), (1, 1)]})[3] == 0.5
    # 40 questions, each +1 in its one seed: more than exact_up_to, so 4000 random patterns, none as extreme
    # (2 in 2^40 would be): p = (1 + 0) / 4001, never the 0 that a plain share of patterns reports
    assert clustered_difference({i: [(True, False)] for i in range(40)})[3] == 1 / 4001


def test_trailing_mean_by_hand():
    """k = 3 over 3, 0, 6, 3: 3/1, 3/2, 9/3, 9/3; k = 1 leaves the values as they are."""
    from sbr.curves import trailing_mean
    assert trailing_mean([3, 0, 6, 3], 3) == [3.0, 1.5, 3.0, 3.0]
    assert trailing_mean([3, 0, 6, 3], 1) == [3, 0, 6, 3]


def test_seed_by_seed_differences(tmp_path):
    """Three seeds, L1 accuracies A 40, 50, 60 and B 46, 48, 70: differences +6, -2, +10, mean 4.67,
    sample std sqrt(((1.33)² + (6.67)² + (5.33)²) / 2) = sqrt(37.33) = 6.11, B ahead in 2 of 3; L2 has
    no accuracy (no questions) and shows "-". Seeds given out of order (other annotation files) are an
    error, never a silent difference."""
    import pytest
    from sbr.results import seed_differences

    def run(name, seed, acc):
        return write_run(tmp_path / f"{name}{seed}", {"L1": [True]}, data_hash=f"h{seed}",
                         table={"L1": {"accuracy": acc}, "L2": {"accuracy": None}})
    a = [run("A", s, x) for s, x in enumerate((40.0, 50.0, 60.0))]
    b = [run("B", s, x) for s, x in enumerate((46.0, 48.0, 70.0))]
    text = seed_differences({"A": a, "B": b})
    assert "### B - A, seed by seed (points)" in text
    assert "| L1 | +6.0, -2.0, +10.0 | +4.7 ± 6.1 | 2 of 3 |" in text and "| L2 | - | - | 0 of 0 |" in text, text
    with pytest.raises(ValueError, match="not the same annotation files"):
        seed_differences({"A": a, "B": b[::-1]})


def test_attention_over_seeds(tmp_path):
    """Two seeds; A's L1 visual_of_prompt 0.20, 0.30 (mean 25.0, sample std 7.1 in x 100), B's 0.26,
    0.28: B - A = +6, -2, mean +2.0 ± 5.7, higher in 1 of 2. A measure that does not apply (None) is
    left out, never a zero; a folder without attention gives no table; seeds out of order are an error."""
    from sbr.results import attention_seeds

    def run(name, seed, vis):
        folder = write_run(tmp_path / f"{name}{seed}", {"L1": [True]}, data_hash=f"h{seed}")
        results = json.load(open(os.path.join(folder, "results.json")))
        results["attention"] = {"L1": {"visual_of_prompt": [vis, 0, 1], "evenness": None}}
        json.dump(results, open(os.path.join(folder, "results.json"), "w"))
        return folder
    a = [run("A", s, v) for s, v in enumerate((0.20, 0.30))]
    b = [run("B", s, v) for s, v in enumerate((0.26, 0.28))]
    text = attention_seeds({"A": a, "B": b}, columns=("L1",), measures=("visual_of_prompt", "evenness"))
    assert "| A, visual_of_prompt | 25.0 ± 7.1 |" in text and "| B, visual_of_prompt | 27.0 ± 1.4 |" in text
    assert "| B, visual_of_prompt | +2.0 ± 5.7 (1 of 2 higher) |" in text
    assert "| A, evenness | - |" in text and "| B, evenness | - (0 of 0 higher) |" in text
    plain = [write_run(tmp_path / f"X{s}", {"L1": [True]}, data_hash=f"h{s}") for s in range(2)]
    assert attention_seeds({"A": a, "X": plain}) == ""
    with pytest.raises(ValueError, match="not the same annotation files"):
        attention_seeds({"A": a, "B": b[::-1]})
