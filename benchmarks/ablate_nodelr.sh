#!/usr/bin/env bash
# FinetuneConfig.node_lr_scale on the recipe-ablation split: CIFAR-10 ResNet-20 (option A) at active fraction 0.40,
# 3 epochs on 10,000 training images, top-1 on 5,000 held-out training images (benchmarks/ablate_recipe.py),
# behind benchmarks/results/ablate_nodelr_r20{,_lr04,_s1}.{md,png}:
#   base: the default tree, the tree with node_lr_scale (aw_nodelr) and FPGM, at lr 0.01, seed 0;
#   lr04: the default tree and FPGM at lr 0.04 everywhere (the leaves' lr under the scale): is 0.01 simply too low
#         for every method?
#   s1:   base's three on training seed 1.
#   bash benchmarks/ablate_nodelr.sh [base|lr04|s1|report ...]  (default: all, in that order; each run resumes)
# About 4-6 minutes per tree and 2.5 per FPGM on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/steps.sh
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs}

ablate() { $PY -m benchmarks.ablate_recipe --track "$@"; }
base() { ablate --out "$OUT/ablate_nodelr" --variants aw_nodelr aw_nocover fpgm_kd; }
lr04() { ablate --out "$OUT/ablate_nodelr_lr04" --lr 0.04 --variants fpgm_kd aw_nocover; }
s1() { ablate --out "$OUT/ablate_nodelr_s1" --variants aw_nodelr_s1 aw_nocover_s1 fpgm_kd_s1; }
report() {
  local part
  for part in "" _lr04 _s1; do
    ablate --out "$OUT/ablate_nodelr$part" --report "benchmarks/results/ablate_nodelr_r20$part.md"
  done
}

steps "$0" "base lr04 s1 report" "base lr04 s1 report" "$@"; exit
