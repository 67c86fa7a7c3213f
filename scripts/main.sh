#!/usr/bin/env bash
# The main job: compare SigmaB with dense, FPGM (Torch-Pruning, NNI) and HRank.
# No arguments: the embedded digits comparison (a few minutes on 2 cores). Installs what it needs first.
source "$(dirname "$0")/env.sh"
exec "$PY" examples/compare_baselines.py "$@"
