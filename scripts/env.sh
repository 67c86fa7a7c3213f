# Sourced by main.sh and test.sh: create ./.venv once and install what the project needs into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${SIGMAB_VENV:-.venv}
STAMP="$VENV/.sigmab-installed-$(cat pyproject.toml scripts/env.sh | sha256sum | cut -c1-16)"
export PYTHONWARNINGS=ignore  # quiet setuptools' deprecation pages during the install
if [ ! -f "$STAMP" ]; then
  echo "[sigmab] installing into $VENV (first run only; torch is large)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  # torch/torchvision are pinned to the builds this project is tested with
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" >&2 || true
  "$VENV/bin/pip" install -q -e '.[dev,nni,plots,onnx,points]' 2>&1 | grep -v "is ignored" >&2 || true
  "$VENV/bin/python" -c "import torch, timm, torch_pruning, sigmab_plugin" \
    || { echo "[sigmab] installation failed" >&2; exit 1; }
  rm -f "$VENV"/.sigmab-installed-*
  touch "$STAMP"
fi
unset PYTHONWARNINGS
PY="$VENV/bin/python"
