#!/usr/bin/env bash
# One prepared GPU check (issue 7; docs/GPU_CHECK.md): bash bench/gpu_check.sh OUTDIR
#
# Parts, each in its own process under its own hard time limit (`timeout`), all under one global deadline, so the
# whole check ends in < 8 min on the GPU even if a part hangs; a part's failure is recorded and the next one runs:
#   preflight     python/torch/CUDA/card, package versions, that ray/mlflow/ffcv are absent
#   data          the small FiF-mini of data/gpu_check (carried; built here only where FFCV exists)
#   tests         pytest tests/test_gpu.py (device placement, bf16 autocast, 2-task loop, merges, 1-process DDP)
#   mfu_<config>  bench/train_step_mfu.py for finetune, lora, bitfit, merge (one process each)
#   budget_table  bench/gpu_budget_table.py (Tab.4-style MAF table vs the paper's Tab. 4 steps)
# Without CUDA it is the CPU dry run: the same parts, small (tiny model, few steps, tests on the CPU).
# Writes OUTDIR/gpu_check.json, OUTDIR/gpu_check.md and OUTDIR/gpu_check.log (each via a temp name + rename).
# Ray, MLflow and FFCV are blocked in every Python process (a sitecustomize meta-path finder), here as on the GPU
# machine, which has none of them: the check proves the core (loop, budget, evaluation, methods, merges) runs alone.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/block" "$WORK/logs" "$WORK/status" "$WORK/parts"
START_EPOCH=$(date +%s)
STARTED_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export FOMO_GPU_CHECK_FIFMINI="${FOMO_GPU_CHECK_FIFMINI:-$ROOT/data/gpu_check/fifmini}"
BASE_PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# A blocked package looks installed to probes (importlib.util.find_spec, as accelerate/transformers do) but fails
# to import, so optional-dependency checks of third-party libraries keep working while any real import fails.
cat > "$WORK/block/sitecustomize.py" <<'EOF'
import importlib.abc
import importlib.machinery
import sys

BLOCKED = ("ray", "mlflow", "ffcv")


class _Absent(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked by bench/gpu_check.sh)", name=spec.name)

    def exec_module(self, module):
        raise ModuleNotFoundError(f"No module named {module.__name__!r}", name=module.__name__)


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, _Absent()) if name.partition(".")[0] in BLOCKED else None


sys.meta_path.insert(0, _Block())
EOF

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
  MODE=gpu; DEVICE=cuda; GLOBAL_S=450
  CAP_PREFLIGHT=60; CAP_DATA=120; CAP_TESTS=150; CAP_MFU=75; CAP_BUDGET=150; PER_TEST=90
else
  MODE=cpu-dry-run; DEVICE=cpu; GLOBAL_S=1800
  CAP_PREFLIGHT=120; CAP_DATA=300; CAP_TESTS=600; CAP_MFU=300; CAP_BUDGET=400; PER_TEST=300
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
fi
export FOMO_GPU_CHECK_DEVICE="$DEVICE"
GLOBAL_S="${GPU_CHECK_GLOBAL_S:-$GLOBAL_S}"  # override only to test the limits themselves
DEADLINE=$((START_EPOCH + GLOBAL_S))
echo "gpu_check: mode $MODE, python $PY, output $OUT, global limit ${GLOBAL_S}s"

# run_part NAME CAP BLOCK(yes|no) CMD...: runs CMD under min(CAP, time left), logs to $WORK/logs/NAME.log and
# records {status, rc, seconds, limit_s} in $WORK/status/NAME.json. GPU_CHECK_PARTS="tests mfu_lora ..." runs only
# those parts (and preflight), e.g. to rerun a failed part within the same device lease.
run_part() {
  local name="$1" cap="$2" block="$3"; shift 3
  local now left limit rc status t0 t1 ms secs
  if [ -n "${GPU_CHECK_PARTS:-}" ] && [ "$name" != preflight ] && [[ " $GPU_CHECK_PARTS " != *" $name "* ]]; then
    echo '{"status": "not selected"}' > "$WORK/status/$name.json"
    return
  fi
  now=$(date +%s); left=$((DEADLINE - now - 15))  # keep 15 s for the report
  limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 10 ]; then
    echo "{\"status\": \"skipped\", \"rc\": null, \"seconds\": 0, \"limit_s\": $limit, \"note\": \"global time limit reached\"}" \
      > "$WORK/status/$name.json"
    echo "gpu_check: $name skipped (global time limit)"
    return
  fi
  local pp="$BASE_PYTHONPATH"
  [ "$block" = yes ] && pp="$WORK/block:$pp"
  t0=$(date +%s%N)
  PYTHONPATH="$pp" timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 )); secs="$((ms / 1000)).$(( (ms % 1000) / 100 ))"
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '{"status": "%s", "rc": %d, "seconds": %s, "limit_s": %d}\n' "$status" "$rc" "$secs" "$limit" \
    > "$WORK/status/$name.json"
  echo "gpu_check: $name $status (rc $rc, $secs s of $limit s)"
}

# ----------------------------------------------------------------------------------------------------- parts
run_part preflight "$CAP_PREFLIGHT" yes "$PY" - "$WORK/parts/preflight.json" <<'EOF'
import importlib.metadata as md, json, platform, shutil, subprocess, sys
import torch
out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "packages": {}, "missing": []}
for dist in ("torch", "open_clip_torch", "peft", "timm", "transformers", "pandas", "numpy", "pyyaml", "pillow",
             "huggingface_hub", "safetensors", "ftfy", "regex", "tqdm", "pytest", "pytest-timeout"):
    try:
        out["packages"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        out["missing"].append(dist)
out["blocked_importable"] = []
for mod in ("ray", "mlflow", "ffcv"):
    try:
        __import__(mod)
        out["blocked_importable"].append(mod)
    except ImportError:
        pass
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30,
               multiprocessors=p.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # noqa: BLE001 - informational only; the DDP test exercises NCCL for real
        out["nccl"] = f"unknown ({type(e).__name__})"
else:
    out["device_name"] = "cpu"
if shutil.which("nvidia-smi"):
    q = "name,memory.total,clocks.max.sm,power.limit,driver_version"
    out["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip()
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
sys.exit(1 if out["missing"] and any(d in out["missing"] for d in ("open_clip_torch", "peft", "pytest")) else 0)
EOF

# unblocked: FFCV (where it exists) writes the betons; the GPU machine must have the carried copy
run_part data "$CAP_DATA" no "$PY" -c "
import os, sys
from pathlib import Path
root = Path(os.environ['FOMO_GPU_CHECK_FIFMINI'])
if not (root / 'manifest.json').is_file():
    from fomo_ray.data.loaders import ffcv_available
    if not ffcv_available():
        sys.exit(f'no FiF-mini at {root} and no FFCV to write it: run bench/make_gpu_wheels.sh where FFCV exists '
                 f'and carry data/gpu_check')
    from fomo_ray.prep.fifmini import ensure_fifmini
    ensure_fifmini(root, seed=0, image_size=32, scale=0.05, progress=False)
from fomo_ray.data.format import open_benchmark
b = open_benchmark(root)
print('FiF-mini', root, {s: b.num_rows(s) for s in ('pool', 'train', 'test')})
"

TIMEOUT_OPT=()
if PYTHONPATH="$BASE_PYTHONPATH" "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_OPT=(--timeout "$PER_TEST"); fi
run_part tests "$CAP_TESTS" yes "$PY" -m pytest --noconftest -p no:cacheprovider -q -rA ${TIMEOUT_OPT[@]+"${TIMEOUT_OPT[@]}"} \
  --junitxml="$WORK/parts/junit.xml" tests/test_gpu.py

for config in finetune lora bitfit merge; do
  run_part "mfu_$config" "$CAP_MFU" yes "$PY" bench/train_step_mfu.py --configs "$config" --device "$DEVICE" \
    --out "$WORK/parts/mfu_$config.json"
done

run_part budget_table "$CAP_BUDGET" yes "$PY" bench/gpu_budget_table.py --device "$DEVICE" \
  --out "$WORK/parts/budget_table.json"

# ----------------------------------------------------------------------------------------------------- report
END_EPOCH=$(date +%s)
PYTHONPATH="$WORK/block:$BASE_PYTHONPATH" timeout 60 "$PY" - "$WORK" "$OUT" "$MODE" "$STARTED_UTC" \
  "$((END_EPOCH - START_EPOCH))" <<'EOF'
"""Assemble the parts into OUTDIR/gpu_check.json + .md + .log (temp names, then rename)."""
import json, os, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, mode, started, wall = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
sys.path.insert(0, str(Path.cwd() / "bench"))
from train_step_mfu import markdown as mfu_markdown  # noqa: E402


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests_from_junit(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or "").splitlines()[0][:300] if node.get("message") else ""
        cases.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message})
    return cases


ORDER = ["preflight", "data", "tests", "mfu_finetune", "mfu_lora", "mfu_bitfit", "mfu_merge", "budget_table"]
status = {name: load(work / "status" / f"{name}.json") for name in ORDER}
status = {name: s if s is not None else {"status": "missing"} for name, s in status.items()}
preflight = load(work / "parts" / "preflight.json") or {}
CONFIGS = ("finetune", "lora", "bitfit", "merge")
mfu_parts = [p for p in (load(work / "parts" / f"mfu_{c}.json") for c in CONFIGS) if p]
mfu = {k: v for k, v in mfu_parts[0].items() if k not in ("results", "errors", "markdown")} if mfu_parts else {
    "profile": mode, "device_name": preflight.get("device_name"), "arch": "?", "batch_size": "?", "steps": "?",
    "warmup": "?"}
mfu.update(results=[r for p in mfu_parts for r in p["results"]],
           errors={c: e for p in mfu_parts for c, e in p["errors"].items()})
for c in CONFIGS:  # a part killed by its time limit (or crashed) before writing its result
    s = status[f"mfu_{c}"]
    if s.get("status") not in ("ok", "not selected") and c not in mfu["errors"] \
            and not any(r["config"] == c for r in mfu["results"]):
        mfu["errors"][c] = f"part {s.get('status')} (rc {s.get('rc')}); see gpu_check.log"
if not mfu["results"] and not mfu["errors"]:
    mfu = None
budget = load(work / "parts" / "budget_table.json")
tests = tests_from_junit(work / "parts" / "junit.xml")
report = {"schema": "fomo_ray.gpu_check/v1", "mode": mode, "started_utc": started, "wall_s": wall,
          "device_name": preflight.get("device_name"), "preflight": preflight, "parts": status,
          "tests": tests, "mfu": mfu, "budget_table": budget}
report["ok"] = all(s.get("status") in ("ok", "not selected") for s in status.values())

md = [f"# GPU check ({mode})", "",
      f"{report['device_name'] or '?'}; torch {preflight.get('torch', '?')} (CUDA {preflight.get('torch_cuda')}); "
      f"Python {preflight.get('python', '?')}; started {started}; wall {wall} s; all parts ok: {report['ok']}.", ""]
if preflight.get("nvidia_smi"):
    md += [f"nvidia-smi: `{preflight['nvidia_smi']}`", ""]
md += ["| part | status | seconds | limit s |", "| --- | --- | --- | --- |"]
md += [f"| {name} | {s.get('status')}{' (' + s['note'] + ')' if s.get('note') else ''} | {s.get('seconds', '-')} | "
       f"{s.get('limit_s', '-')} |" for name, s in status.items()]
if tests:
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
    md += ["", "## Tests (tests/test_gpu.py)", "", ", ".join(f"{v} {k}" for k, v in counts.items() if v), ""]
    md += [f"- {t['outcome']}: `{t['name']}` ({t['seconds']:.1f} s){' - ' + t['message'] if t['message'] else ''}"
           for t in tests if t["outcome"] != "passed"]
if mfu:
    md += ["", "## Training-step throughput and MFU (bench/train_step_mfu.py)", "", mfu_markdown(mfu)]
if budget:
    md += ["", "## Budget table (bench/gpu_budget_table.py)", "", budget.get("markdown", "")]

log = []
for p in sorted((work / "logs").glob("*.log")):
    log += [f"===== {p.stem} =====", p.read_text(errors="replace")[-200_000:]]
for name, text in (("gpu_check.json", json.dumps(report, indent=1)), ("gpu_check.md", "\n".join(md) + "\n"),
                   ("gpu_check.log", "\n".join(log) + "\n")):
    tmp = out / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / name)
print("\n".join(md))
sys.exit(0 if report["ok"] else 1)
EOF
rc=$?
echo "gpu_check: wrote $OUT/gpu_check.json, gpu_check.md, gpu_check.log in $(( $(date +%s) - START_EPOCH )) s"
exit $rc
