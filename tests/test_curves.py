"""Training curves (sbr/curves.py, the paper's Figure 3) from runs' metrics.jsonl: several runs and seeds on
one figure, panels that compare methods on one y-range, evaluations at the run's last step, the CLI's errors."""
import json
import os

import pytest

from sbr.curves import main, plot


def run(folder, accuracy, length):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step, (a, n) in enumerate(zip(accuracy, length), 1):
            f.write(json.dumps({"step": step, "rewards/accuracy": a, "reward": a, "completion_length": n,
                                "kl": 0.01 * step, "entropy": 1.0, "loss": 0.0}) + "\n")
        f.write('{"step": 9, "rewar')                   # a torn last line of a killed run is passed over
    return str(folder)


def test_figure3_from_runs_and_seeds(tmp_path):
    g0 = run(tmp_path / "s0" / "grpo", [0.2, 0.4, 0.6], [100, 90, 80])
    g1 = run(tmp_path / "s1" / "grpo", [0.1, 0.3, 0.5], [110, 95, 85])
    care = run(tmp_path / "s0" / "care", [0.5, 0.7, 0.9], [60, 60, 60])
    lims = plot({"GRPO": [g0, g1], "GRPO-CARE": [care]}, ["accuracy:GRPO", "accuracy:GRPO-CARE", "completion_length"],
                str(tmp_path / "curves.png"), smooth=2)
    assert lims[0] == lims[1] and lims[0][0] <= 0.1 and lims[0][1] >= 0.9     # one y-range for both reward panels
    assert lims[2][0] <= 60 and lims[2][1] >= 110 and os.path.getsize(tmp_path / "curves.png") > 10_000
    evaluation = tmp_path / "eval"
    os.makedirs(evaluation)
    with open(evaluation / "results.json", "w") as f:
        json.dump({"config": {"model": os.path.join(g0, "export")}, "table": {"L1": {"accuracy": 40.0},
                                                                             "L3 overall": {"accuracy": 30.0}}}, f)
    out = tmp_path / "figure3.png"
    main([f"GRPO={g0},{g1}", care, "--out", str(out), "--panels", "accuracy", "completion_length", "kl",
          "--evals", str(evaluation)])
    assert os.path.getsize(out) > 10_000
    with pytest.raises(SystemExit, match=r"no such file: .*nowhere/metrics.jsonl"):
        main([str(tmp_path / "nowhere")])
