#!/usr/bin/env bash
# Command (b) of the README: set everything up (idempotent), then run the whole test suite.
# Extra arguments are passed to pytest (e.g. `bash scripts/test.sh -k config`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the tests also render the MLflow UI in headless Chromium (tests/test_ui_browser.py; skipped where it is missing)
EXTRA_APT_PKGS="chromium" bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
exec .venv/bin/python -m pytest "$@"
