#!/usr/bin/env bash
# Create .venv (if missing) and install varshift with every extra.
# torch is pinned *first*, with the torchvision built for it: the `zoo` extra (torchvision, timm)
# needs torch 2.14.1 (torchvision 0.28 does not load beside torch 2.13.0's CPU build), and an
# unpinned torch would pull whatever CUDA build is newest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.varshift-installed"
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install --quiet -e ".[all,dev]"
touch "$stamp"
