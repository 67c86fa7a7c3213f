#!/usr/bin/env bash
# The ModelNet40 / PointNet++ comparison behind benchmarks/results/modelnet40.md (issue 9), resumable.
#   pretrain: the dense PointNet++ (SSG by default) trained from scratch on ModelNet40 (1,024 points,
#             ../shared/data/modelnet40-1024.npz), one checkpoint per epoch;
#   compare:  from that dense model, SigmaB (depth 2), FPGM and HRank at active fractions 0.40 and
#             0.30 with the same fine-tuning (epochs, SGD schedule, point-cloud augmentation,
#             distillation from the dense model), and the dense model fine-tuned the same way;
#   report:   benchmarks/results/modelnet40.{md,json,png} (overall and mean-class accuracy).
# Every step resumes from its per-epoch checkpoints (--resume), so the script can be rerun until done.
#   bash benchmarks/modelnet40.sh [pretrain|compare|report ...]   (default: all three)
#   MODEL=pointnet2_msg WIDTH=0.25 PRE_EPOCHS=12 EPOCHS=3 set the variant (the report states them);
#   OUT and RESULTS move the run folder and the report; STEM names the report (default modelnet40).
#   compare: FRACS="0.40" runs only those budgets, METHODS="sigmab fpgm" only those methods, SEED=1 another seed;
#   TAG=x gives the runs their own folders (<model>_f<frac>_s<seed>_x), so a new recipe's rows stand beside the
#   committed ones in the report instead of replacing them.
# On 2 CPU cores at width 0.25, with freed memory kept (compare_baselines' default since 2026-12-07), an epoch
# takes about 5 minutes for the dense model and FPGM and 6.5 for the tree (before: 9-11.5 and 23 minutes; the
# 8-epoch pretraining of 2026-12-07 took 98 minutes then; benchmarks/results/allocator_speed.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-pointnet2_ssg}
WIDTH=${WIDTH:-0.25}
OUT=${OUT:-runs/modelnet40/${MODEL}_w${WIDTH}}
RESULTS=${RESULTS:-benchmarks/results}
STEM=${STEM:-modelnet40}
# EXTRA: more compare_baselines options, e.g. "--train-limit 64 --test-limit 32" for a smoke test
read -r -a extra <<< "${EXTRA:-}"
common=(--quiet --resume --data modelnet40 --model "$MODEL" --width "$WIDTH" --batch-size 32 --calib-size 256
        "${extra[@]}")

pretrain() {
  $PY examples/compare_baselines.py "${common[@]}" --methods dense --epochs 0 --pretrain-epochs "${PRE_EPOCHS:-12}" \
    --out "$OUT/pretrain"
}

compare() {
  local ckpt=$OUT/pretrain/pretrain/checkpoint.pt
  [ -f "$ckpt" ] || { echo "no dense checkpoint at $ckpt: run the pretrain step first" >&2; exit 2; }
  local seed=${SEED:-0} m
  for m in ${METHODS:-}; do
    case $m in
      dense|sigmab|fpgm|hrank) ;;
      *) echo "METHODS=\"$METHODS\": $m is not one of dense sigmab fpgm hrank" >&2; exit 2 ;;
    esac
  done
  for frac in ${FRACS:-0.40 0.30}; do
    local all=(sigmab fpgm hrank) methods=()
    [ "$frac" = 0.40 ] && all=(dense sigmab fpgm hrank)
    for m in "${all[@]}"; do
      if [ -z "${METHODS:-}" ] || [[ " $METHODS " == *" $m "* ]]; then methods+=("$m"); fi
    done
    [ ${#methods[@]} -gt 0 ] || continue
    $PY examples/compare_baselines.py "${common[@]}" --checkpoint "$ckpt" --epochs "${EPOCHS:-3}" --lr 0.01 \
      --seed "$seed" --target-fraction "$frac" --methods "${methods[@]}" \
      --out "$OUT/runs/${MODEL}_f${frac}_s${seed}${TAG:+_$TAG}"
  done
}

report() {  # rows of runs whose folders are gone come from the committed report
  local prior=()
  [ -f "$RESULTS/$STEM.json" ] && prior=(--prior "$RESULTS/$STEM.json")
  $PY -m benchmarks.report_long "$OUT/runs" "$RESULTS" "$STEM" benchmarks/modelnet40.sh 1.72 "${prior[@]}"
}

# exit on the line bash has already read: an edit to this file during a long run cannot run stray lines
steps "$0" "pretrain compare report" "pretrain compare report" "$@"; exit
