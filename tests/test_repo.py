"""Repository-level promises: every shipped YAML validates, the README's two commands and the config reference
(docs/CONFIG.md) are true."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fomo_ray.config import ExperimentConfig, load_config, reference_markdown

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "data", "runs", "node_modules", ".whl", "build"}


def shipped_yaml() -> list[Path]:
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".pytest")]
        out += [Path(root, f) for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(out)


@pytest.mark.parametrize("path", shipped_yaml(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_validates(path):
    """Sweep specs go through the sweep validator (config keys + values of every trial), experiment configs through
    the config tree, cluster-launcher files must parse (tests/test_sweep.py runs Ray's own validation on them)."""
    rel = path.relative_to(REPO)
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{rel}: top level must be a mapping"
    if rel.parts[0] == "cluster":
        assert {"cluster_name", "provider"} <= set(data), f"{rel}: not a Ray cluster-launcher file"
    elif "space" in data or "base" in data:
        from fomo_ray.planning.sweep_spec import load_sweep, validate_space

        spec = load_sweep(path)
        base = load_config(spec.config or None, spec.base)
        assert validate_space(base, spec.space) >= 1
    else:
        fields = {f for f in ExperimentConfig.__dataclass_fields__}
        assert set(data) <= fields, f"{rel}: unknown top-level keys {set(data) - fields}"
        load_config(path)


def test_config_reference_is_generated():
    text = (REPO / "docs" / "CONFIG.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    assert start in text and end in text
    block = text.split(start, 1)[1].split(end, 1)[0]
    assert block.strip() == reference_markdown().strip(), "docs/CONFIG.md is stale: regenerate its table with " \
        "`python -m fomo_ray.config`"


def test_two_commands_exist_and_ci_runs_the_test_command():
    readme = (REPO / "README.md").read_text()
    for cmd in ("bash scripts/quickstart.sh", "bash scripts/test.sh"):
        assert cmd in readme
        assert (REPO / cmd.split()[1]).is_file()
    assert "experiments/sweep_merge_weights.py" in (REPO / "scripts" / "quickstart.sh").read_text()
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    for script in ("scripts/setup.sh", "scripts/quickstart.sh", "scripts/test.sh", ".ci/run"):
        subprocess.run(["bash", "-n", str(REPO / script)], check=True)  # syntax


def test_the_fast_lane_is_the_marker_expression_and_the_rest_passes_through(tmp_path):
    """`bash scripts/test.sh --fast` is pytest's `-m "not slow and not ray"`; every other argument reaches pytest as
    given, and no argument at all is the whole suite (what .ci/run runs). Checked on a copy whose set-up and Python are
    stand-ins that print what they were given."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "test.sh").write_text((REPO / "scripts" / "test.sh").read_text())
    (tmp_path / "scripts" / "setup.sh").write_text("true\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    python.chmod(0o755)

    def argv(*args, **env):
        out = subprocess.run(["bash", str(tmp_path / "scripts" / "test.sh"), *args], capture_output=True, text=True,
                             env={**{k: v for k, v in os.environ.items() if k != "TEST_WORKERS"}, **env})
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    workers = ["-n", "2", "--dist", "loadgroup"]  # two pytest-xdist workers, a module's tests on one of them
    assert argv() == ["-m", "pytest", *workers]
    assert argv("--fast") == ["-m", "pytest", *workers, "-m", "not slow and not ray"]
    assert argv("-k", "loop and not ray", "--fast", "-x") == ["-m", "pytest", *workers, "-k", "loop and not ray",
                                                              "-m", "not slow and not ray", "-x"]
    assert argv("--fast", TEST_WORKERS="0") == ["-m", "pytest", "-n", "0", "--dist", "loadgroup", "-m",
                                                "not slow and not ray"]


def test_console_script_lists_commands():
    exe = Path(sys.executable).parent / "fomo-ray"  # installed by setup.cfg's console_scripts entry point
    assert exe.is_file(), f"{exe} missing: the package is not installed with its console script"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("prepare", "run", "sweep", "report", "score", "budget", "ui"):
        assert f"  {name}" in out.stdout
    bad = subprocess.run([str(exe), "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr


@pytest.mark.parametrize("command", ["run", "sweep", "report", "score", "budget", "ui", "export", "pretrain",
                                     "prepare fifmini", "prepare fif", "prepare pool", "prepare stream",
                                     "prepare tokens"])
def test_help_texts_are_plain_and_name_only_files_in_the_repo(command, capsys):
    """Issue 13: no rst/markdown backticks in --help, and every file a help text names exists in the repo."""
    import re

    from fomo_ray.cli import main

    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "`" not in text and "DESIGN" not in text, text
    for name in re.findall(r"\b((?:docs|bench|scripts|experiments)/[\w./-]+\.\w+)", text):
        assert (REPO / name).exists(), f"fomo-ray {command} --help names {name}, which is not in the repo"


def test_version():
    import subprocess
    import sys

    import fomo_ray

    out = subprocess.run([sys.executable, "-m", "fomo_ray.cli", "--version"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"fomo-ray {fomo_ray.__version__}"
