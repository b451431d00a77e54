#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine: FFCV's system packages, a virtualenv in .venv,
# and fomo_ray in editable mode. A second run skips every finished step.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
APT_PKGS="pkg-config libturbojpeg0-dev libopencv-dev ${EXTRA_APT_PKGS:-}"

missing=()
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi

# Re-install only when the dependency spec changed (hash of setup.cfg + setup.py).
STAMP=.venv/.fomo_ray_installed
WANT="$(cat setup.cfg setup.py | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing fomo_ray and its pinned dependencies into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  # FFCV's setup.py imports numpy and looks up OpenCV via pkg-config at build time.
  .venv/bin/python -m pip install -q "numpy>=2.4,<2.5" "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q --no-build-isolation "ffcv==1.0.2" || \
    .venv/bin/python -m pip install -q "ffcv==1.0.2"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$WANT" > "$STAMP"
else
  echo "[setup] .venv up to date"
fi
