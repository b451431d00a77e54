#!/usr/bin/env bash
# Prepare, on a machine WITH network and FFCV, what the GPU machine cannot make itself (docs/GPU_CHECK.md):
#
#   1. .whl/  wheels of the pure-Python packages the GPU check needs and the GPU machine lacks:
#      open_clip_torch (+ ftfy, wcwidth) and pytest (+ pluggy, iniconfig, pygments, pytest-timeout).
#      Deliberately NOT brought: huggingface_hub, safetensors, tqdm, regex, pyyaml, packaging. The GPU machine
#      already has them as dependencies of timm/peft/transformers, and shadowing them with other versions via
#      PYTHONPATH could break transformers (e.g. huggingface_hub 2.x needs httpx2, which is not there).
#   2. data/gpu_check/fifmini  a small FiF-mini (scale 0.05, 32 px, seed 0). Writing betons needs FFCV, which the
#      GPU machine does not have; reading them ("memory" loader backend) is plain numpy, so the loop test there
#      opens this prebuilt copy (carry it with the run).
#
# Usage: bash bench/make_gpu_wheels.sh [--no-data]     (from anywhere; paths are relative to the repo root)
# Both outputs are git-ignored; carry them: run(carry=[".whl", "data/gpu_check"], ...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WHEEL_DIR="$ROOT/.whl"
# pinned to what this project's venv runs (setup.cfg / pip list), so the GPU check tests the same code
WHEELS=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0
)
MAX_WHEEL_MB=20

# -------------------------------------------------------------------------------------------- 1. wheels
rm -rf "$WHEEL_DIR.tmp"
mkdir -p "$WHEEL_DIR.tmp"
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEEL_DIR.tmp" "$spec" \
    || { echo "make_gpu_wheels: could not download wheel $spec" >&2; exit 1; }
done
# every wheel must be installable by the GPU machine's Python 3.12 without a compiler
for w in "$WHEEL_DIR.tmp"/*; do
  case "$w" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-*.whl|*-abi3-*.whl) ;;
    *) echo "make_gpu_wheels: $w is not a py3/cp312 wheel" >&2; exit 1 ;;
  esac
done
size_mb=$(du -sm "$WHEEL_DIR.tmp" | cut -f1)
if [ "$size_mb" -gt "$MAX_WHEEL_MB" ]; then
  echo "make_gpu_wheels: wheels take ${size_mb} MB (> ${MAX_WHEEL_MB} MB carry allowance)" >&2
  exit 1
fi
rm -rf "$WHEEL_DIR"
mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"    # complete or absent, never half a set
echo "make_gpu_wheels: $(ls "$WHEEL_DIR" | wc -l) wheels, ${size_mb} MB in .whl/"

# -------------------------------------------------------------------------------------------- 2. small FiF-mini
if [ "${1:-}" != "--no-data" ]; then
  HF_HUB_OFFLINE=1 "$PY" -c "
from fomo_ray.prep.fifmini import ensure_fifmini
b = ensure_fifmini('data/gpu_check/fifmini', seed=0, image_size=32, scale=0.05, progress=False)
print('make_gpu_wheels: FiF-mini (scale 0.05) at', b.root, 'rows', {s: b.num_rows(s) for s in ('pool', 'train', 'test')})
"
  echo "make_gpu_wheels: data/gpu_check takes $(du -sm data/gpu_check | cut -f1) MB"
fi
