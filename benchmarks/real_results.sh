#!/usr/bin/env bash
# Real-data comparisons behind benchmarks/results/real_results.md (CPU, 2 cores: ~45 min).
# Every number in that report comes from these commands, then benchmarks/report_real.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=../shared/weights
common=(--quiet --epochs 3 --batch-size 64 --lr 0.01 --train-limit 10000 --calib-size 512)
# 1. CIFAR-10 (JPEG set), pretrained CIFAR ResNet-56 (option A), depth 2 and depth 3
$PY examples/compare_baselines.py "${common[@]}" --model resnet56 --shortcut A --checkpoint $W/resnet56-4bfd9763.th \
  --data cifar10-jpeg --depth 2 --keep-ratio 0.5 --methods dense sigmab fpgm hrank --out runs/real/cifar10_d2
$PY examples/compare_baselines.py "${common[@]}" --model resnet56 --shortcut A --checkpoint $W/resnet56-4bfd9763.th \
  --data cifar10-jpeg --depth 3 --keep-ratio 0.5 --methods sigmab fpgm hrank --out runs/real/cifar10_d3
# 1b. the same at keep ratio 0.35 without sibling coverage (option-A shortcuts leave no prunable
#     residual stream, so keep 0.5 cannot reach the 55% reduction goal)
$PY examples/compare_baselines.py "${common[@]}" --model resnet56 --shortcut A --checkpoint $W/resnet56-4bfd9763.th \
  --data cifar10-jpeg --depth 2 --keep-ratio 0.35 --no-coverage --methods sigmab fpgm hrank --out runs/real/cifar10_d2_k035
# 2. Tiny-ImageNet-100 at 32x32: a CIFAR ResNet-20 (option B) trained from scratch here, then compared
$PY examples/compare_baselines.py "${common[@]}" --model resnet20 --shortcut B --pretrain-epochs 6 \
  --train-limit 25000 --data tiny-imagenet-100-32 --depth 2 --keep-ratio 0.5 \
  --methods dense sigmab fpgm hrank --out runs/real/tiny100_d2
$PY benchmarks/report_real.py runs/real benchmarks/results
