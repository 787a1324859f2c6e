#!/usr/bin/env bash
# One command: install everything into .venv, then run varshift's main job on built-in data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
.venv/bin/varshift demo --out demo-output
