#!/usr/bin/env bash
# The fair long-budget comparison behind benchmarks/results/long_comparison.md (issue 4).
# CIFAR-10 (JPEG set) from the pretrained CIFAR ResNet-20 and ResNet-56 (option A), the full 50,000-image
# training set, the same epochs, schedule, distillation and seed for every method, all 10,000 test images.
# SigmaB at active fractions 0.40 and 0.30; FPGM and HRank at 0.30, 0.40 and 0.55; dense; a second seed
# at 0.40 and 0.30; SigmaB at 0.45 (two seeds) last, so the active fraction at which it matches FPGM's 0.55 top-1
# is read between measured points (extrapolated, and flagged, when the tree's 0.45 mean is still below).
# Every run checkpoints each epoch and resumes (--resume), so the script can be rerun across sessions until it
# is complete; then `report` writes the table, the plot and the reading.
#   bash benchmarks/long_comparison.sh [r20|r56|report ...]   (default: r20 r56 report)
#   EPOCHS_R20=4 EPOCHS_R56=3 (the defaults, those of every committed row) set the epochs.
#   ONLY="f0.30_s0 f0.55_s0" runs only those budget/seed pairs (the others are skipped, not deleted).
#   METHODS="sigmab fpgm" runs only those methods of each run; a later run of others goes into the same
#   folder, and its results.json keeps the earlier methods' rows (--resume).
#   RECON=1 adds --reconstruct (every pruned method refit to the dense layer outputs before fine-tuning)
#   and writes to runs/long/*_recon, so the report shows those rows beside the plain ones (as "+recon").
#   RIDGE="0.01 fpgm=1 hrank=1" (with RECON=1) passes --reconstruct-ridge: one number for every method, or
#   METHOD=NUMBER for one; the runs go to runs/long/*_recon_<RIDGE with spaces as _>.
#   STATIC_SHAPE=tree passes --static-shape tree (FPGM/HRank keep the tree's backbone whole and prune its levels in
#   the tree's proportion) and KEEP_SHAPE="1 0.7" passes --keep-shape 1 0.7 (SigmaB's per-level keep ratios); the
#   runs go to runs/long/*_treealloc and runs/long/*_shape<KEEP_SHAPE with spaces as _>.
#   ROUTER_GRID=2 passes --router-grid 2 (SigmaB's routers read a 2x2 grid of cells); runs go to runs/long/*_grid2.
#   NODE_LR=1 passes --node-lr-scale (each SigmaB node's layers at lr x the nodes of its level; the default since
#   2026-12-07, so a plain run now trains so too) into runs/long/*_nodelr. The committed plain rows ran before it
#   (the report names them sigmab+node_lr_scale=False); NODE_LR=0 passes --no-node-lr-scale, which reproduces them.
#   TAG=name appends _name to every run folder (runs/long/*_name): a rerun under another default (e.g. the
#   tree's channel score) keeps the earlier rows beside it instead of replacing them.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
PY=${PY:-.venv/bin/python}
W=../shared/weights
common=(--quiet --resume --data cifar10-jpeg --shortcut A --batch-size 64 --lr 0.01 --calib-size 512)
suffix=""
if [ "${RECON:-0}" = 1 ]; then common+=(--reconstruct); suffix=_recon; fi
if [ -n "${RIDGE:-}" ]; then
  [ -n "$suffix" ] || { echo "RIDGE=\"$RIDGE\" needs RECON=1 (it sets the refit's ridge)" >&2; exit 2; }
  read -ra ridge <<< "$RIDGE"
  common+=(--reconstruct-ridge "${ridge[@]}"); suffix=_recon_${RIDGE// /_}
fi
if [ -n "${STATIC_SHAPE:-}" ]; then common+=(--static-shape "$STATIC_SHAPE"); suffix+=_${STATIC_SHAPE}alloc; fi
if [ -n "${KEEP_SHAPE:-}" ]; then
  read -ra shape <<< "$KEEP_SHAPE"
  common+=(--keep-shape "${shape[@]}"); suffix+=_shape${KEEP_SHAPE// /_}
fi
if [ -n "${ROUTER_GRID:-}" ]; then common+=(--router-grid "$ROUTER_GRID"); suffix+=_grid$ROUTER_GRID; fi
case ${NODE_LR:-} in
  1) common+=(--node-lr-scale); suffix+=_nodelr ;;
  0) common+=(--no-node-lr-scale) ;;  # the recipe of the committed plain rows, into their folders
  "") ;;
  *) echo "NODE_LR=$NODE_LR: use 1 (--node-lr-scale, runs/long/*_nodelr) or 0 (--no-node-lr-scale)" >&2; exit 2 ;;
esac
suffix+=${TAG:+_$TAG}

run() {  # model checkpoint epochs fraction seed methods...
  local model=$1 ckpt=$2 epochs=$3 frac=$4 seed=$5
  shift 5
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" f${frac}_s${seed} "* ]]; then return 0; fi
  local methods=() m
  for m in "$@"; do
    if [ -z "${METHODS:-}" ] || [[ " $METHODS " == *" $m "* ]]; then methods+=("$m"); fi
  done
  [ ${#methods[@]} -gt 0 ] || return 0
  $PY examples/compare_baselines.py "${common[@]}" --model "$model" --checkpoint "$W/$ckpt" --epochs "$epochs" \
    --target-fraction "$frac" --seed "$seed" --methods "${methods[@]}" \
    --out "runs/long/${model}_f${frac}_s${seed}${suffix}"
}

both() {  # model checkpoint epochs
  local dense=dense
  [ -n "$suffix" ] && dense=""  # --reconstruct and TAG leave the dense model alone: the plain run's dense row stands
  run "$1" "$2" "$3" 0.40 0 $dense sigmab fpgm hrank
  run "$1" "$2" "$3" 0.40 1 sigmab fpgm hrank  # the second seed first: it tests the headline comparison
  run "$1" "$2" "$3" 0.30 0 sigmab fpgm hrank
  run "$1" "$2" "$3" 0.30 1 sigmab fpgm hrank  # a second seed where the lead is largest
  run "$1" "$2" "$3" 0.55 0 fpgm hrank
  run "$1" "$2" "$3" 0.45 0 sigmab  # the tree between its 0.40 and FPGM's 0.55: the matched-top-1 reading
  run "$1" "$2" "$3" 0.45 1 sigmab  # its second seed, as at 0.40, so that reading rests on two seeds at each end
}

r20() { both resnet20 resnet20-12fca82f.th "${EPOCHS_R20:-4}"; }
r56() { both resnet56 resnet56-4bfd9763.th "${EPOCHS_R56:-3}"; }
report() {  # rows of runs whose directories are gone come from the committed report
  local prior=()
  [ -f benchmarks/results/long_comparison.json ] && prior=(--prior benchmarks/results/long_comparison.json)
  $PY -m benchmarks.report_long runs/long benchmarks/results "${prior[@]}"
}

# exit on the line bash has already read: an edit to this file during a long run cannot run stray lines
steps "$0" "r20 r56 report" "r20 r56 report" "$@"; exit
