"""Presets: one settings file that moves a study from the scale it was sized for to another, and the check that a
sweep sized for the tiny CPU models is not launched on a real backbone by mistake.

A shipped sweep (``experiments/configs/sweep_*.yaml``) is sized for the tiny CPU models on FiF-mini (``sized_for:
tiny``: e.g. lr 1e-3 and 240 fine-tuning steps over the stream). The same numbers on ViT-B/16 would be 100x the paper's
learning rate at about 1% of its budget. ``--preset paper`` lays ``experiments/configs/presets/paper.yaml`` (the
paper's setting: ViT-B/16 at 224 px, b = 512, T = 20, 28,400 fine-tuning steps, AdamW 1e-5 / wd 0.2 on every
parameter, cosine with 10% warm-up restarted per task, clip 1.0, bf16; Roth et al. 2024, arXiv 2408.14471, Sec. 3-4)
over the sweep's own ``base``, then the sweep's ``presets: {paper: {base: ..., space: ...}}`` section, where a study
says what its swept values become at that scale (the model-size study's architectures, the budget study's budgets).
Flags and ``key=value`` arguments still win over all of it.

Precedence, lowest first: the config defaults < the sweep's ``config:`` file < its ``base`` < the preset file < the
sweep's ``presets.<name>.base`` < flags and ``key=value`` arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from fomo_ray.config import ConfigError, load_config, read_yaml_mapping

#: where named presets live: beside the shipped sweeps
PRESET_DIR = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "presets"
SIZES = ("tiny", "real")  # what a sweep may declare it was sized for
SIZING_KEYS = ("optimizer.lr", "budget.total_ft_steps", "stream.num_tasks", "mixture.batch_size")  # shown in the error
TINY_ARCHS = ("fomo-tiny-s", "fomo-tiny-m", "fomo-tiny-l")  # backbones.TINY_ARCHS, without importing torch here


class PresetError(ValueError):
    """A preset name or file cannot be used; the message names it."""


def preset_path(name: str, near: Path | None = None) -> Path:
    """The preset ``name``: a YAML file path, or a name looked up in ``near/presets/`` (the sweep file's folder) and
    then in the shipped ``experiments/configs/presets/``."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise PresetError(f"preset file not found: {p}")
        return p
    folders = [f for f in ((near / "presets") if near else None, PRESET_DIR) if f is not None]
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted({f.stem for folder in folders if folder.is_dir() for f in folder.glob("*.yaml")})
    raise PresetError(f"unknown preset '{name}' (presets: {', '.join(known) or 'none'}; or give a YAML file)")


def preset_overrides(path: Path) -> dict[str, Any]:
    """The dotted keys a preset file sets (a nested experiment-config YAML, validated as one)."""
    data = read_yaml_mapping(path, "preset file", PresetError)
    try:
        load_config(path)
    except ConfigError as e:
        raise PresetError(f"preset {path}: {e}") from e
    return dict(_leaves(data))


def _leaves(data: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in data.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def swept_backbones(base_backbone: str, space: Mapping[str, Any]) -> set[str]:
    """Every ``backbone.name`` a sweep's trials can run: the base one unless a dimension sweeps it, plus the swept
    values (grid / choice values and ``points`` bundles)."""
    found: set[str] = set()
    swept = False
    for key, dim in space.items():
        if dim.kind in ("points", "references"):  # ((label, {dotted: value}), ...)
            found.update(str(bundle["backbone.name"]) for _, bundle in dim.values if "backbone.name" in bundle)
        elif key == "backbone.name":
            swept = True
            found.update(str(v) for v in dim.values)
    return found if swept else found | {base_backbone}


def check_sized_for(value: Any, source: str) -> str:
    """A sweep's ``sized_for:`` ("" when it does not say)."""
    if value and value not in SIZES:
        raise PresetError(f"{source}: sized_for '{value}' is not one of {list(SIZES)}")
    return str(value or "")


def check_presets(raw: Any, source: str) -> dict[str, dict[str, Any]]:
    """A sweep's ``presets: {name: {base: {dotted: value}, space: {key: dimension}}}``: what the sweep becomes at a
    preset's scale (its ``space`` dimensions replace the sweep's own of the same key)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) for v in raw.values()):
        raise PresetError(f"{source}: 'presets' must map a preset name to {{base: ..., space: ...}}")
    for name, section in raw.items():
        unknown = sorted(set(section) - {"base", "space"})
        if unknown:
            raise PresetError(f"{source}: presets.{name}: unknown key(s) {unknown}; valid: ['base', 'space']")
    return {str(k): dict(v) for k, v in raw.items()}


def sizing_error(name: str, sized_for: str, backbones: set[str], flat: Mapping[str, Any]) -> str | None:
    """Why a sweep sized for the tiny models must not run on these backbones as it is (None: it may). ``flat``: the
    sweep's base config, flat."""
    real = sorted(b for b in backbones if b not in TINY_ARCHS)
    if sized_for != "tiny" or not real:
        return None
    shown = ", ".join(f"{k} {flat[k]}" for k in SIZING_KEYS if k in flat) or "its base"
    return (f"sweep '{name}' is sized for the tiny CPU models ({shown}) but would run backbone "
            f"{', '.join(real)}: add --preset paper for the paper's setting (experiments/configs/presets/paper.yaml: "
            f"ViT-B-16, batch 512, T 20, lr 1e-5, 28,400 fine-tuning steps), or --keep-sizing to run this sizing "
            f"on {real[0]} anyway")
