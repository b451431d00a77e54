"""Issue 27, item 3: the cluster files' nodes get what the pinned torch needs. ``scripts/setup.sh`` picks torch's CUDA
build from the NVIDIA driver (``--torch-index`` prints the choice; checked here with a stand-in ``nvidia-smi``), and
every Ray command of the cluster files runs the .venv's ray, set up by ``scripts/setup.sh`` on every node. Ray's own
validation of the files is ``tests/test_sweep.py::test_cluster_launcher_configs_validate_against_rays_schema``."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _choice(tmp_path: Path, driver: str | None, **env: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    if driver is not None:
        smi.write_text(f"#!/bin/sh\necho '{driver}'\n")
        smi.chmod(0o755)
    elif smi.exists():
        smi.unlink()
    path = f"{bin_dir}:/usr/bin:/bin"
    full_env = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX_URL", "TORCH_CUDA")}
    out = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--torch-index"], capture_output=True,
                         text=True, timeout=60, env={**full_env, "PATH": path, **env}, check=True)
    return out.stdout.splitlines()


@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists(), reason="a real NVIDIA driver answers first")
def test_setup_picks_the_torch_build_the_driver_runs(tmp_path):
    assert _choice(tmp_path, None)[0] == "pypi"  # a CPU-only head: PyPI's build runs on CPUs
    assert _choice(tmp_path, "580.65.06")[0] == "pypi"  # CUDA 13 needs >= 580
    old = _choice(tmp_path, "550.54.15")
    assert old[0] == "index https://download.pytorch.org/whl cu129 cu128 cu126" and "< 580" in old[1]
    assert _choice(tmp_path, "550.54.15", TORCH_CUDA="cu126")[0].endswith("whl cu126")
    assert _choice(tmp_path, "470.82.01")[0] == "unsupported 470.82.01"


@pytest.mark.parametrize("path", sorted((REPO / "cluster").glob("*.yaml")), ids=lambda p: p.stem)
def test_cluster_nodes_run_the_venv_ray_set_up_by_setup_sh(path):
    raw = yaml.safe_load(path.read_text())
    assert any("bash scripts/setup.sh" in c for c in raw["setup_commands"])  # Python >= 3.11 + matching torch
    commands = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    ray_commands = [c for c in commands if c.split()[0].endswith("ray")]
    assert ray_commands and all(c.startswith("~/fomo_ray/.venv/bin/ray ") for c in ray_commands), ray_commands
    provider = {"aws": "boto3", "gcp": "google-api-python-client"}[raw["provider"]["type"]]
    assert any(provider in c and ".venv/bin/python -m pip install" in c for c in raw["head_setup_commands"])
