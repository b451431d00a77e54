#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian/Ubuntu machine: FFCV's system packages, a Python >= 3.11 (setup.cfg's
# python_requires), a virtualenv in .venv, the torch build this machine's NVIDIA driver runs, and fomo_ray in
# editable mode. A second run skips every finished step.
#
#   bash scripts/setup.sh                 # what quickstart.sh, test.sh and the cluster files (cluster/*.yaml) run
#   bash scripts/setup.sh --torch-index   # only print which torch build it would install, and why
#
# Python: $PYTHON, else the first of python3, python3.13, python3.12, python3.11 that is >= 3.11; on an image whose
# python3 is older (Ubuntu 22.04 and the GPU images built on it ship 3.10) it installs Debian's python3.11 (+ venv).
# torch: setup.cfg pins torch==2.14.1, which PyPI serves as a CUDA 13.0 build: it needs an NVIDIA driver >= 580
# (CUDA 13.x's minimum). With an older driver (nvidia-smi, or /proc/driver/nvidia/version) it installs the same
# torch built for CUDA 12 from PyTorch's wheel index instead (CUDA 12.x builds run on drivers >= 525), trying
# $TORCH_CUDA (default: cu129 cu128 cu126) in order; TORCH_INDEX_URL overrides the choice. Without a driver (a
# CPU-only head node, a laptop) PyPI's build is kept: it runs on CPUs. A GPU trial on a process where CUDA still is
# unavailable is refused before its first step, naming torch's CUDA and the driver's (fomo_ray.core.assembly.gpu_problem).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
CUDA13_MIN_DRIVER=580   # CUDA 13.x minimum driver (NVIDIA's minor-version compatibility table)
CUDA12_MIN_DRIVER=525   # CUDA 12.x minimum driver

driver_version() {  # the NVIDIA driver's version, read without CUDA; empty without a driver
  local v=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    v="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ' || true)"
  fi
  if [ -z "$v" ] && [ -r /proc/driver/nvidia/version ]; then
    v="$(sed -n 's/.*Kernel Module[^0-9]*\([0-9][0-9.]*\).*/\1/p' /proc/driver/nvidia/version | head -n1)"
  fi
  echo "$v"
}

torch_choice() {  # "pypi" or "index <url-base> <variants>" or "unsupported <driver>", then a reason
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "url $TORCH_INDEX_URL"; echo "TORCH_INDEX_URL is set"; return
  fi
  local v major
  v="$(driver_version)"
  if [ -z "$v" ]; then
    echo "pypi"; echo "no NVIDIA driver found: PyPI's torch $TORCH_VERSION (CUDA 13.0 build, runs on CPUs too)"; return
  fi
  major="${v%%.*}"
  if [ "$major" -ge "$CUDA13_MIN_DRIVER" ]; then
    echo "pypi"; echo "NVIDIA driver $v >= $CUDA13_MIN_DRIVER: PyPI's torch $TORCH_VERSION (CUDA 13.0 build)"
  elif [ "$major" -ge "$CUDA12_MIN_DRIVER" ]; then
    echo "index https://download.pytorch.org/whl ${TORCH_CUDA:-cu129 cu128 cu126}"
    echo "NVIDIA driver $v < $CUDA13_MIN_DRIVER runs no CUDA 13 build: torch $TORCH_VERSION built for CUDA 12"
  else
    echo "unsupported $v"
    echo "NVIDIA driver $v is older than $CUDA12_MIN_DRIVER: no torch $TORCH_VERSION build runs on it; upgrade the driver (>= $CUDA13_MIN_DRIVER) or use a newer image"
  fi
}

if [ "${1:-}" = "--torch-index" ]; then
  torch_choice
  exit 0
fi

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
APT_PKGS="pkg-config libturbojpeg0-dev libopencv-dev ${EXTRA_APT_PKGS:-}"
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
# shellcheck disable=SC2086
apt_install $APT_PKGS

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
pick_python() {
  local c
  for c in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && new_enough "$c"; then echo "$c"; return 0; fi
  done
  return 1
}
PY="$(pick_python || true)"
if [ -z "$PY" ]; then
  echo "[setup] $(python3 --version 2>&1 || echo 'no python3') is older than setup.cfg's python_requires >= 3.11: installing Debian's python3.11"
  apt_install python3.11 python3.11-venv
  PY="$(pick_python)" || { echo "[setup] no Python >= 3.11 could be installed; set PYTHON=/path/to/python3.11" >&2; exit 1; }
fi
PYV="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  apt_install "python$PYV-venv"  # Debian splits venv/ensurepip off the interpreter
fi

if [ -x .venv/bin/python ] && ! new_enough .venv/bin/python; then
  echo "[setup] .venv has $(.venv/bin/python --version 2>&1): recreating it with $PY ($PYV)"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY ($PYV)"
  "$PY" -m venv .venv
fi

mapfile -t CHOICE < <(torch_choice)
echo "[setup] torch: ${CHOICE[1]}"
case "${CHOICE[0]}" in unsupported*) echo "[setup] ${CHOICE[1]}" >&2; exit 1 ;; esac

# Re-install only when the dependency spec (hash of setup.cfg + setup.py) or the torch build changed.
STAMP=.venv/.fomo_ray_installed
BUILD=""; [ "${CHOICE[0]}" = "pypi" ] || BUILD="${CHOICE[0]}"  # (PyPI's build: the hash of earlier set-ups)
WANT="$( (cat setup.cfg setup.py; echo -n "$BUILD") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing fomo_ray and its pinned dependencies into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  # FFCV's setup.py imports numpy and looks up OpenCV via pkg-config at build time.
  .venv/bin/python -m pip install -q "numpy>=2.4,<2.5"
  read -r kind base variants <<< "${CHOICE[0]}"
  case "$kind" in
    pypi) .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" ;;
    url) .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
           --index-url "$base" --extra-index-url https://pypi.org/simple ;;
    index)
      ok=""
      for cu in $variants; do  # the local version (+cu128) beats PyPI's plain one; ==2.14.1 in setup.cfg accepts it
        if .venv/bin/python -m pip install -q "torch==$TORCH_VERSION+$cu" "torchvision==$TORCHVISION_VERSION+$cu" \
             --index-url "$base/$cu" --extra-index-url https://pypi.org/simple; then ok="$cu"; break; fi
        echo "[setup] no torch $TORCH_VERSION+$cu on $base/$cu; trying the next CUDA 12 build"
      done
      [ -n "$ok" ] || { echo "[setup] no CUDA 12 build of torch $TORCH_VERSION found ($variants): upgrade the NVIDIA driver to >= $CUDA13_MIN_DRIVER or set TORCH_CUDA / TORCH_INDEX_URL" >&2; exit 1; }
      ;;
  esac
  .venv/bin/python -m pip install -q --no-build-isolation "ffcv==1.0.2" || \
    .venv/bin/python -m pip install -q "ffcv==1.0.2"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$WANT" > "$STAMP"
else
  echo "[setup] .venv up to date"
fi
.venv/bin/python -c 'import torch; print(f"[setup] torch {torch.__version__} (CUDA {torch.version.cuda}); CUDA available: {torch.cuda.is_available()}")'
