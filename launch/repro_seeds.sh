#!/usr/bin/env bash
# launch/repro_cpu.sh for several seeds (data, model and training all seeded), then Table 2's layout as
# mean ± std over seeds; how often each method's answer is the one its own reasoning names (GRPO-CARE's
# consistency, exact on this benchmark); each method against SFT and against GRPO, paired and pooled
# over seeds (evaluate.py --compare's statistics, sbr/stats.py) and seed by seed; curves of every seed.
#   bash launch/repro_seeds.sh                      # seeds 0-4: five times launch/repro_cpu.sh; writes runs/repro_seeds/
#   SEEDS="0 1" SMALL=1 bash launch/repro_seeds.sh  # seconds: the pipeline only
# Knobs: ROOT (runs/repro_seeds), SEEDS ("0 1 2 3 4"), and launch/repro_cpu.sh's (ABLATE=1 adds its two
# runs to the tables; RESUME=1 ABLATE=1 on a finished study trains and evaluates only those).
set -euo pipefail
ROOT=${ROOT:-runs/repro_seeds}; SEEDS=${SEEDS:-0 1 2 3 4}
start=$(date +%s)
for seed in $SEEDS; do
    SEED=$seed OUT="$ROOT/seed$seed" CARE=1 bash "$(dirname "$0")/repro_cpu.sh" > "$ROOT.seed$seed.log" 2>&1 || {
        echo "seed $seed failed: see $ROOT.seed$seed.log"; exit 1; }
done
python - "$ROOT" "$(( $(date +%s) - start ))" $SEEDS <<'PY'
import os
import sys
from sbr.curves import plot
from sbr.results import attention_seeds, paired_comparison, seed_differences, seeds_table
from sbr.synth import consistency_table, l3_by_length
root, seconds, seeds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
methods = [("warmup", "Vanilla"), ("sft", "SFT"), ("grpo", "GRPO"), ("care", "GRPO-CARE")]
if os.environ.get("ABLATE") == "1":
    methods += [("care_ema", "EMA reference only"), ("care_bonus", "bonus only")]
runs = {name: [f"{root}/seed{s}/eval/{r}" for s in seeds] for r, name in methods}
text = (f"## CPU-scale SEED-Bench-R1 (synthetic), seeds {' '.join(seeds)}, {seconds} s\n\n"
        f"Accuracy %, mean ± std over seeds:\n\n{seeds_table(runs)}\n\n"
        f"Reasoning vs answer, %, mean ± std over seeds (answered: a parsable letter; consistent: the letter "
        f"that the reasoning's stated next step implies; sbr/synth.py):\n\n{consistency_table(runs)}\n\n"
        f"L3 by the length of the goal's object in tokens, %, mean ± std over seeds (a confound of the synthetic "
        f"benchmark: a longer object is a longer prompt than any trained on):\n\n{l3_by_length(runs)}\n\n"
        f"Where the reasoning looks (evaluate.py --attention true: attention from the tokens inside <think> to "
        f"the prompt, mean over layers and heads, sbr/attention.py; x 100), mean ± std over seeds, then each "
        f"method minus SFT seed by seed:\n\n{attention_seeds({k: runs[k] for k in ('SFT', *(m for m in runs if m != 'SFT'))})}\n\n"
        f"## Paired, pooled over seeds (every seed's questions once)\n\n"
        + paired_comparison([runs["SFT"], runs["GRPO"], runs["GRPO-CARE"]], ["SFT", "GRPO", "GRPO-CARE"]) + "\n\n"
        + paired_comparison([runs["GRPO"], runs["GRPO-CARE"]], ["GRPO", "GRPO-CARE"]) + "\n\n"
        f"## Seed by seed (the training runs' own noise)\n\n"
        + seed_differences({k: runs[k] for k in ("SFT", "GRPO", "GRPO-CARE")}) + "\n"
        + seed_differences({k: runs[k] for k in runs if k not in ("Vanilla", "SFT")}))
open(f"{root}/table.md", "w").write(text)
print(text)
curves = {"GRPO": [f"{root}/seed{s}/grpo" for s in seeds], "GRPO-CARE": [f"{root}/seed{s}/care" for s in seeds],
          "SFT": [f"{root}/seed{s}/sft" for s in seeds]}
drawn = plot(curves, ["accuracy:GRPO", "accuracy:GRPO-CARE", "bonus_rate:GRPO-CARE", "loss:SFT"],
             f"{root}/curves.png", smooth=10)           # the two reward panels share one y-range
print(f"curves: {root}/curves.png" if drawn else "curves: pip install matplotlib (the plot extra) for the PNG")
PY
