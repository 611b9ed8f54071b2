#!/usr/bin/env bash
# The paper's comparison at CPU scale: vanilla vs SFT vs GRPO (and GRPO-CARE) on a synthetic SEED-Bench-R1
# (sbr/synth.py), one seed. launch/repro_seeds.sh runs it for several seeds with error bars.
#   bash launch/repro_cpu.sh                 # ~6.5 min on 2 CPU cores without GRPO-CARE (CARE=0); writes runs/repro/
#   SMALL=1 bash launch/repro_cpu.sh         # a seconds-long version that only checks the pipeline (CI)
# Steps: build data + a small random Qwen2-VL; a warm-up SFT standing in for pre-training (answers that
# report truly how many steps the pictures show done, then a random next step and letter: the format
# and perception, not the planning rule); from that one start, SFT on the chains of thought and GRPO
# with the accuracy reward, and GRPO-CARE (the same, with an EMA reference and the consistency bonus at
# the authors' values, keeping GRPO's beta: see CARE_BETA); evaluate.py on all four (the warm-up is
# "Vanilla"); the table and curves.
# Knobs: OUT (runs/repro), SEED (0), SFT_STEPS, GRPO_STEPS, WARMUP_STEPS, TRAIN, VAL, CARE (1; 0 skips it),
# COT_NOISE (0: the SFT chains state the rule; 0.5: half are templated, as the paper's distilled
# data often were; python -m sbr.synth --cot_noise), CARE_BETA (0.02, GRPO's: with the authors' 0 at
# this learning rate, seed 0 collapsed at step 9, entropy 0.3 -> 5.5 and no answer after, where GRPO's
# KL pulled the same spike back), ABLATE (1 also trains GRPO-CARE's two parts apart: care_ema, the EMA
# reference without the bonus; care_bonus, the bonus with the frozen reference), RESUME (1 continues
# what OUT already holds: the data kept, every training run resumed from its newest checkpoint with its
# flags checked against it, every evaluation skipping the predictions it wrote; a finished run costs
# only its export), VARY_LENGTH (1: training questions of several lengths, sbr.synth.FILLERS, so that L3's
# longer objects are not also prompts longer than any trained on; 0: the earlier, confounded benchmark).
set -euo pipefail
OUT=${OUT:-runs/repro}; SEED=${SEED:-0}; CARE=${CARE:-1}; CARE_BETA=${CARE_BETA:-0.02}; COT_NOISE=${COT_NOISE:-0}
VARY_LENGTH=${VARY_LENGTH:-1}
ABLATE=${ABLATE:-0}; RESUME=${RESUME:-0}
if [ -n "${SMALL:-}" ]; then
    TRAIN=${TRAIN:-32}; VAL=${VAL:-8}; WARMUP_STEPS=${WARMUP_STEPS:-2}; SFT_STEPS=${SFT_STEPS:-2}; GRPO_STEPS=${GRPO_STEPS:-2}
else
    TRAIN=${TRAIN:-1200}; VAL=${VAL:-240}; WARMUP_STEPS=${WARMUP_STEPS:-200}; SFT_STEPS=${SFT_STEPS:-150}; GRPO_STEPS=${GRPO_STEPS:-200}
fi
COMMON=(--data_root "$OUT/data" --frame_size 56 --num_workers 0 --activation_checkpointing false --seed "$SEED")
TRAINING=(--save_every 100000 --resume "$([ "$RESUME" = 1 ] && echo true || echo false)")
start=$(date +%s)

if [ "$RESUME" != 1 ] || [ ! -f "$OUT/init/model.safetensors" ]; then
    python -m sbr.synth "$OUT/data" --train "$TRAIN" --val "$VAL" --seed "$SEED" --cot_noise "$COT_NOISE" --model "$OUT/init" \
        $([ "$VARY_LENGTH" = 1 ] && echo --vary_length)
fi
python train_sft.py --model "$OUT/init" "${COMMON[@]}" "${TRAINING[@]}" --train_file annotations/warmup.jsonl \
    --out_dir "$OUT/warmup" --max_steps "$WARMUP_STEPS" --batch_size 16 --micro_batch_size 16 \
    --learning_rate 1e-3 --warmup_ratio 0.05 --log_every 10
python train_sft.py --model "$OUT/warmup/export" "${COMMON[@]}" "${TRAINING[@]}" --out_dir "$OUT/sft" \
    --max_steps "$SFT_STEPS" --batch_size 16 --micro_batch_size 16 --learning_rate 1e-3 --warmup_ratio 0.05 --log_every 10
grpo() {   # grpo NAME FLAGS...: GRPO from the warm-up into $OUT/NAME, the settings every variant shares
    local name=$1; shift
    python train_grpo.py --model "$OUT/warmup/export" "${COMMON[@]}" "${TRAINING[@]}" --out_dir "$OUT/$name" \
        --max_steps "$GRPO_STEPS" --num_generations 8 --questions_per_rank 4 --micro_batch_questions 4 \
        --max_completion_length 24 --learning_rate 5e-4 --log_every 10 --rollout_log_every 25 "$@"
}
grpo grpo --beta 0.02
RUNS=(warmup sft grpo)
EMA=(--ema_decay 0.995 --ema_every 10)
if [ "$CARE" = 1 ]; then
    grpo care --beta "$CARE_BETA" --reference ema "${EMA[@]}" --consistency_bonus 0.5
    RUNS+=(care)
fi
if [ "$ABLATE" = 1 ]; then
    grpo care_ema --beta "$CARE_BETA" --reference ema "${EMA[@]}" --consistency_bonus 0
    grpo care_bonus --beta "$CARE_BETA" --reference frozen --consistency_bonus 0.5
    RUNS+=(care_ema care_bonus)
fi
EXAMPLES=$(python -c "import matplotlib" 2>/dev/null && echo 2 || echo 0)   # pictures need the plot extra
for run in "${RUNS[@]}"; do      # --attention: where the reasoning looks (sbr/attention.py), one more forward a question
    python evaluate.py --model "$OUT/$run/export" "${COMMON[@]:0:4}" --out_dir "$OUT/eval/$run" \
        --max_new_tokens 32 --batch_size 32 --attention true --attention_examples "$EXAMPLES" > "$OUT/eval_$run.log"
done
python - "$OUT" "$(( $(date +%s) - start ))" "$SEED" "${RUNS[@]}" <<'PY'
import sys
from sbr.curves import plot
from sbr.results import compare
out, seconds, seed, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
names = {"warmup": "Vanilla (warm-up)", "sft": "SFT", "grpo": "GRPO", "care": "GRPO-CARE",
         "care_ema": "EMA reference only", "care_bonus": "bonus only"}
table = compare([f"{out}/eval/{r}" for r in runs], [names[r] for r in runs])
text = f"## CPU-scale SEED-Bench-R1 (synthetic), seed {seed}, {seconds} s\n\n{table}\n"
open(f"{out}/table.md", "w").write(text)
print(text)
drawn = plot({"GRPO": [f"{out}/grpo"], "SFT": [f"{out}/sft"]}, ["reward:GRPO", "kl:GRPO", "loss:SFT"],
             f"{out}/curves.png")
print(f"curves: {out}/curves.png" if drawn else "curves: pip install matplotlib (the plot extra) for the PNG")
PY
