#!/usr/bin/env bash
# Command (a) of the README: set everything up (idempotent), then run the main job on the embedded default
# benchmark (FiF-mini is generated and the tiny base CLIP pretrained on first use, then cached under data/).
# Extra arguments are passed to experiments/sweep_merge_weights.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec .venv/bin/python experiments/sweep_merge_weights.py "$@"
