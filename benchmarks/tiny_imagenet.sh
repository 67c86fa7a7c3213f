#!/usr/bin/env bash
# Tiny-ImageNet-100 at 32x32 from a pretrained 100-class network (issue 6's "Tiny-ImageNet-100 once"),
# behind benchmarks/results/tiny_imagenet.{md,json,png}. Resumable: every step checkpoints each epoch.
#   adapt:   the CIFAR-100 ResNet-56 (option B, ../shared/weights/cifar100_resnet56-f2eff4c8.pt) trained
#            PRE_EPOCHS epochs on Tiny-ImageNet-100's 50,000 training images (the harness's pretraining
#            step: SGD at PRE_LR, cosine, no distillation), its classifier zeroed first (--reset-classifier):
#            CIFAR-100's classes are not these, and at the harness's from-scratch lr 0.1 with that head the
#            first epoch ended at 2.2% training top-1 (zeroed head, lr 0.02: 25.6%; tiny_imagenet.md);
#   compare: from that dense model, SigmaB (depth 2), FPGM and HRank at active fraction 0.40 with the same
#            fine-tuning (EPOCHS epochs, lr 0.01, distillation from the dense model; one epoch by default, for
#            2 CPU cores);
#   split:   FPGM given the tree's split of the budget (--static-shape tree), the strongest static
#            variant on CIFAR-10 (benchmarks/results/long_comparison.md);
#   dense:   the dense model fine-tuned the same way (the report's "vs dense" reference);
#   report:  benchmarks/results/tiny_imagenet.{md,json,png} (EPOCHS other than 1: tiny_imagenet_e<EPOCHS>.*, so
#            runs of different lengths are never averaged).
#   bash benchmarks/tiny_imagenet.sh [adapt|compare|split|dense|report ...]  (default: all, in that order)
#   PRE_EPOCHS=2 PRE_LR=0.02 EPOCHS=1 FRACTION=0.40 SEED=0 are the defaults; OUT moves the run folder.
#   METHODS picks compare's methods (default "sigmab fpgm hrank"); DENSE fine-tunes an adapted model made by another
#   run (default $OUT/adapt/pretrain/checkpoint.pt), e.g. a longer run in its own OUT without adapting again:
#   EPOCHS=3 OUT=runs/tiny_imagenet_e3 DENSE=runs/tiny_imagenet/adapt/pretrain/checkpoint.pt METHODS="sigmab fpgm" \
#     bash benchmarks/tiny_imagenet.sh compare report
#   EXTRA adds compare_baselines.py options to compare, in the run folder suffixed by TAG (required with EXTRA), e.g.
#   METHODS=sigmab EXTRA=--node-lr-scale TAG=nodelr bash benchmarks/tiny_imagenet.sh compare report
# On 2 CPU cores a ResNet-56 fine-tuning epoch over 50,000 images took 9 minutes for FPGM (92 images/s) and 16 as
# a tree (53 images/s; tiny_imagenet.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/tiny_imagenet}
FRACTION=${FRACTION:-0.40}
SEED=${SEED:-0}
common=(--quiet --resume --data tiny-imagenet-100-32 --model resnet56 --shortcut B --batch-size 64 --calib-size 512
        --seed "$SEED")
dense_ckpt=${DENSE:-$OUT/adapt/pretrain/checkpoint.pt}

adapt() {
  $PY examples/compare_baselines.py "${common[@]}" --checkpoint ../shared/weights/cifar100_resnet56-f2eff4c8.pt \
    --methods dense --epochs 0 --pretrain-epochs "${PRE_EPOCHS:-2}" --pretrain-lr "${PRE_LR:-0.02}" --reset-classifier \
    --out "$OUT/adapt"
}

tuned() {  # folder methods... [options]: one fine-tuning run from the adapted dense model
  local folder=$1
  shift
  [ -f "$dense_ckpt" ] || { echo "no adapted dense model at $dense_ckpt: run the adapt step first" >&2; exit 2; }
  $PY examples/compare_baselines.py "${common[@]}" --checkpoint "$dense_ckpt" --epochs "${EPOCHS:-1}" --lr 0.01 \
    --target-fraction "$FRACTION" --out "$OUT/runs/$folder" --methods "$@"
}

compare() {  # EXTRA: more compare_baselines.py options, in a run folder of their own named by TAG
  [ -z "${EXTRA:-}" ] || [ -n "${TAG:-}" ] || { echo "EXTRA=$EXTRA needs a TAG for its run folder" >&2; exit 2; }
  tuned "resnet56_f${FRACTION}_s${SEED}${TAG:+_$TAG}" ${METHODS:-sigmab fpgm hrank} ${EXTRA:-}
}
split() { tuned "resnet56_f${FRACTION}_s${SEED}_treealloc" fpgm --static-shape tree; }
dense() { tuned "resnet56_f${FRACTION}_s${SEED}" dense; }

report() {  # rows of runs whose folders are gone come from the committed report; one report per epoch count
  local stem=tiny_imagenet prior=()
  [ "${EPOCHS:-1}" = 1 ] || stem=tiny_imagenet_e$EPOCHS
  [ -f "benchmarks/results/$stem.json" ] && prior=(--prior "benchmarks/results/$stem.json")
  $PY -m benchmarks.report_long "$OUT/runs" benchmarks/results "$stem" benchmarks/tiny_imagenet.sh 3 "${prior[@]}"
}

# exit on the line bash has already read: an edit to this file during a long run cannot run stray lines
steps "$0" "adapt compare split dense report" "adapt compare split dense report" "$@"; exit
