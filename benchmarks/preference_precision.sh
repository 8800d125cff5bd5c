#!/bin/bash
# Which of the speed work applies to TRL's preference trainers, measured: DPO on the default model with
# model.dtype=auto (a bf16 frozen base + bf16 autocast on a CPU with AVX512-BF16 / AMX) against float32,
# alternating, twice each, alone on the machine. 48 pairs of the shipped demo, 6 steps of 8, the demo's
# settings otherwise; the reference pass runs in every run (cache off).
#
#     bash benchmarks/preference_precision.sh [OUT_DIR]      # about 10 minutes on 2 cores
#
# Prints, per run: training tokens/s (TRL's non-padding count of both sides of each pair), wall time, peak
# RSS, the mean training loss and the held-out reward margin vs the base. Results of the last run:
# benchmarks/results/preference_precision.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}
head -48 data/preference_train.jsonl > "$out/train48.jsonl"
lscpu | grep -E "Model name" ; lscpu | grep -o -E "avx512_bf16|amx_bf16|avx512f" | sort -u | tr '\n' ' '; echo
for i in 1 2; do
  for d in auto float32; do
    run="$out/$d-$i"
    HF_HUB_OFFLINE=1 /usr/bin/time -v .venv/bin/llm-finetune train --config config/dpo_config.json \
      --set data.train_file="$out/train48.jsonl" --set model.dtype=$d --set train.max_steps=6 \
      --set train.save_steps=100 --set preference.cache_reference=false --set eval.max_examples=8 \
      --set eval.regression_file=null --set output.dir="$run/ck" --set output.logs_dir="$run/logs" \
      > "$run.out" 2> "$run.err"
    echo "$d run $i: $(grep -o 'training done.*' "$run/logs/training.log"); $(grep -o 'reward margin vs the base: [-+0-9.]*' "$run/logs/training.log"); $(grep -E 'Elapsed' "$run.err" | tr -s ' '); $(grep -E 'Maximum resident' "$run.err" | tr -s ' ')"
  done
done
