#!/usr/bin/env bash
# Command (b) of the README: set everything up (idempotent), then run the whole test suite (what CI runs).
# `--fast` runs only the tests not marked `slow` or `ray` (a few minutes on 2 cores: the lane to use while developing).
# Other arguments are passed to pytest (e.g. `bash scripts/test.sh -k config`, `bash scripts/test.sh --fast -x`).
# Tests run in TEST_WORKERS pytest-xdist workers (default 2: on 2 cores the suite is about half idle in one process,
# waiting on Ray, MLflow and subprocesses); a module's tests stay on one worker (tests/conftest.py); TEST_WORKERS=0
# runs them in this process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
args=(-n "${TEST_WORKERS:-2}" --dist loadgroup)
for arg in "$@"; do
  if [[ "$arg" == "--fast" ]]; then
    args+=(-m "not slow and not ray")
  else
    args+=("$arg")
  fi
done
# the tests also render the MLflow UI in headless Chromium (tests/test_ui_browser.py; skipped where it is missing)
EXTRA_APT_PKGS="chromium" bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
exec .venv/bin/python -m pytest ${args[@]+"${args[@]}"}
