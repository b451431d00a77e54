"""Where a result comes from: fomo_ray's version, the git commit of the checkout the code runs from, and the
platform (CPU or GPU and the kernels torch runs on it) that computed it."""
from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def code_version() -> tuple[str, str]:
    """``(version, commit)``: ``fomo_ray.__version__`` (else the installed package's) and ``git rev-parse HEAD`` of
    the checkout this package is imported from, with ``+changes`` when tracked files differ from it ("unknown"
    outside a checkout, e.g. an installed wheel)."""
    import fomo_ray

    version = getattr(fomo_ray, "__version__", "")
    if not version:
        try:
            from importlib.metadata import version as installed

            version = installed("fomo_ray")
        except Exception:  # noqa: BLE001 - not installed either
            version = "unknown"
    where = Path(fomo_ray.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", head.stdout.strip()):
            return version, "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return version, "unknown"
    return version, head.stdout.strip() + ("+changes" if dirty else "")


@functools.lru_cache(maxsize=None)
def platform() -> dict[str, str]:
    """What a run's numbers depend on besides config, seed and code: the CPU model, the kernel path torch dispatches
    to on it (``AVX512``, ``AVX2``, ...), the GPU (``none`` on CPU) and torch's version.

    One config and seed give bitwise the same numbers on one platform. Another CPU runs other kernels (another ISA,
    or a vendor-specific BLAS path) whose float sums differ in the last bits; over thousands of steps that moves every
    score, the pretrained tiny bases' included (docs/REPRODUCIBILITY.md).
    """
    import torch

    return {"cpu": _cpu_model(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "gpu": _gpu_model(),
            "torch": torch.__version__}


def platform_label(p: dict[str, str] | None = None) -> str:
    """A platform as tables and tags show it, e.g. ``AMD EPYC, AVX512 kernels, torch 2.14.1``."""
    p = platform() if p is None else p
    where = p.get("cpu", "unknown CPU") + f", {p.get('cpu_kernels', '?')} kernels"
    if p.get("gpu", "none") != "none":
        where = f"{p['gpu']} ({where})"
    return f"{where}, torch {p.get('torch', '?')}"


def recorded_platform(record: dict) -> str:
    """The platform a result's record (``summary.json``, a base checkpoint's meta) names, as tables show it;
    ``platform not recorded`` for one written before platforms were recorded."""
    return platform_label(record["platform"]) if record.get("platform") else "platform not recorded"


def _gpu_model() -> str:
    """The visible GPUs' model names (``none`` without CUDA), without initialising CUDA in a process that has not: a
    sweep driver that did would hold a context on a GPU its trials need."""
    import torch

    if not torch.cuda.is_available():
        return "none"
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "CUDA GPU"
    return ", ".join(sorted({line.strip() for line in out.splitlines() if line.strip()})) or "CUDA GPU"


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else what :mod:`platform` knows)."""
    import platform as stdlib_platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return stdlib_platform.processor() or stdlib_platform.machine() or "unknown CPU"


def short_commit(commit: str) -> str:
    """A recorded commit as generated tables show it: 12 hex digits, plus ``with uncommitted changes`` for a
    ``+changes`` one."""
    return commit[:12] + (" with uncommitted changes" if commit.endswith("+changes") else "")


def commit_stamp() -> str:
    """How a generated table names the code it ran: ``commit`` and this checkout's :func:`short_commit`."""
    return f"commit {short_commit(code_version()[1])}"


def write_block(path: str | Path, start: str, end: str, text: str) -> None:
    """Replace what lies between the markers ``start`` and ``end`` in the file ``path`` by ``text`` (the generated
    tables of README.md and docs/: every number in them is the output of a script, never typed in)."""
    path = Path(path)
    body = path.read_text()
    if body.count(start) != 1 or body.count(end) != 1:
        raise SystemExit(f"{path} needs exactly one {start} ... {end} block")
    before, rest = body.split(start, 1)
    from fomo_ray.atomic import write_text

    write_text(path, f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
