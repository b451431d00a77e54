"""A run's deployed model, out of fomo_ray and into plain open_clip.

What a run keeps is its *resume* state (``checkpoint.LoopState``: trained weights, adapters, method state such as a
merge history, optimizer, buffer, RNG), not the model it serves: a merge method deploys a merged model m_t, not the
trained theta_t, and a peft method trains adapters beside frozen weights in a model whose attention was swapped for
linear layers. :func:`deployed_state` rebuilds the run's model and method exactly as the loop does, asks the method
for its deployed weights after the last task, merges adapters into the base weights and restores open_clip's module
layout, so the result loads *strictly* into ``open_clip.create_model(arch)``.

:func:`save_open_clip` writes that state dict in open_clip's own local format (what its hub export writes)::

    DIR/open_clip_pytorch_model.bin    torch.save(state_dict)
    DIR/open_clip_config.json          {"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": {...}}
    DIR/<arch>.json                    only for fomo_ray's tiny archs, which open_clip does not know by name
    DIR/fomo_ray.json                  provenance: arch, fomo_ray version, run, config hash, source (written last)

and open_clip loads it without fomo_ray::

    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")   # + open_clip.get_tokenizer(...)

By name, a tiny architecture must first be made known: ``open_clip.add_model_config(DIR)`` (reads ``DIR/<arch>.json``)
or ``import fomo_ray.models.backbones; fomo_ray.models.backbones.register_tiny_archs()``; then
``open_clip.create_model_and_transforms(arch, pretrained="DIR/open_clip_pytorch_model.bin")``.

:func:`load_model` accepts an export directory, a ``fomo-ray run`` directory, a directory (or ``loop_state.pt``)
holding a loop state, or an MLflow run id / ``runs:/<id>`` with ``tracking_uri``; :func:`export` writes any of those
in the format above. Bad input raises :class:`ExportError` naming the path or run.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from fomo_ray.config import ExperimentConfig

WEIGHTS_FILE = "open_clip_pytorch_model.bin"  # open_clip's HF_WEIGHTS_NAME
CONFIG_FILE = "open_clip_config.json"  # open_clip's HF_CONFIG_NAME
INFO_FILE = "fomo_ray.json"
EXPORT_FORMAT = "fomo_ray.export/v1"
MODEL_ARTIFACT = "model"  # where a finished trial logs its export in MLflow (ray_train._Bridge.finish)
STATE_ARTIFACT = "checkpoints/final"  # ... and its final loop state
DEPLOYED_DIR = "model"  # an ended trial's final checkpoint trimmed to its export (retention.py, ray.keep_after_run)
_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})(?:/(.*))?$")


class ExportError(ValueError):
    """The source cannot be exported (missing, incomplete or of another kind); the message names the path or run."""


# --------------------------------------------------------------------------------------------------- state -> CLIP
def deployed_state(cfg: ExperimentConfig, state: Any) -> dict[str, torch.Tensor]:
    """The plain open_clip ``CLIP`` state dict of what ``state`` (a task-end ``LoopState`` of a run of ``cfg``)
    deploys: the method's deployed weights after the last finished task, adapters merged, wrapper prefixes removed.

    Rebuilt as ``assembly.build_run`` + ``checkpoint.restore`` do (architecture, ``method.setup``, model and method
    state), on the CPU and without touching the caller's RNG. Raises :class:`ExportError` for a mid-task state (its
    trained weights are half a task; no deployed model exists for them) and when the result does not match the
    architecture's own keys and shapes."""
    from fomo_ray.models.backbones import quiet_random_init, create_backbone
    from fomo_ray.methods import build_method

    if state.step > 0:
        raise ExportError(f"loop state of run '{state.run}' is mid-task (task {state.task}, step {state.step}): only "
                          f"a task-end state has a deployed model; finish the run (fomo-ray run --resume) or use a "
                          f"task-end checkpoint")
    with torch.random.fork_rng(devices=[]), quiet_random_init():  # adapter init draws; weights are loaded next
        backbone = create_backbone(cfg.backbone.name, "", device="cpu", precision="fp32")
        expected = {k: tuple(v.shape) for k, v in backbone.model.state_dict().items()}
        method = build_method(cfg)
        model = method.setup(backbone.model)
    try:
        model.load_state_dict(state.model)
        method.load_state_dict(state.method)
    except (RuntimeError, KeyError, ValueError) as e:  # another architecture or method family than the state's
        raise ExportError(f"the loop state of run '{state.run}' does not fit the config (backbone.name "
                          f"'{cfg.backbone.name}', method.name '{cfg.method.name}'): {str(e).splitlines()[0]}") from e
    last = max(int(state.task) - 1, 0)  # the cursor names the next task: the last finished one is task - 1
    model.load_state_dict(method.deployed_weights(last, model))
    merge_adapters(model)
    from fomo_ray.methods.peft_mha import unswap_attention

    unswap_attention(model)
    from fomo_ray.models.backbones import strip_wrappers

    out = {strip_wrappers(k): v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ExportError(f"deployed weights of run '{state.run}' (method '{cfg.method.name}') do not match "
                          f"open_clip's '{cfg.backbone.name}': {', '.join(diff[:8])}")
    return out


def merge_adapters(model: nn.Module) -> int:
    """Merge every peft adapter layer (LoRA, DoRA, VeRA) into its base layer and put the base layer back in its place,
    in place, as peft's ``merge_and_unload`` does (the methods inject adapters into the CLIP module itself and keep
    no peft wrapper to call it on). Returns how many layers were merged; peft is imported only when there are any."""
    layers = [(n, m) for n, m in model.named_modules() if type(m).__module__.startswith("peft.")
              and hasattr(m, "base_layer") and hasattr(m, "merge")]
    for name, layer in layers:
        layer.merge(safe_merge=True)  # safe: a non-finite merged weight raises instead of being exported
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return len(layers)


# --------------------------------------------------------------------------------------------------- open_clip files
def model_config(arch: str) -> dict[str, Any]:
    """open_clip's model config of ``arch`` (tiny archs registered first)."""
    import open_clip

    from fomo_ray.models.backbones import register_tiny_archs

    register_tiny_archs()
    found = open_clip.get_model_config(arch)
    if not found:
        raise ExportError(f"open_clip knows no architecture '{arch}' (config key 'backbone.name')")
    return found


def trained_quick_gelu(cfg: ExperimentConfig) -> bool:
    """The activation the run's model was built with (``backbones.resolve_quick_gelu`` of its config): from the tag's
    open_clip pretrained config or the base checkpoint's meta. A base file that is gone leaves only
    ``backbone.quick_gelu`` (or a tiny architecture, always GELU) to say it; otherwise the export is refused rather
    than written with a guessed activation."""
    from fomo_ray.models.backbones import run_quick_gelu

    found = run_quick_gelu(cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.quick_gelu)
    if found is None:
        raise ExportError(f"the run's base checkpoint {cfg.backbone.pretrained} (backbone.pretrained) is gone, so the "
                          f"activation its weights were trained with cannot be read: set backbone.quick_gelu (true "
                          f"for OpenAI/DFN/MetaCLIP-style QuickGELU weights, false for GELU) in the run's config")
    return found


def preprocess_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The evaluation preprocessing open_clip gave the run's backbone: defaults, the pretrained tag's mean/std/
    interpolation when ``backbone.pretrained`` is a tag, and the model's image size (as ``open_clip.create_model``)."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    from fomo_ray.models.backbones import is_checkpoint_path

    arch, tag = cfg.backbone.name, cfg.backbone.pretrained
    pp: dict[str, Any] = asdict(PreprocessCfg())
    if tag and tag != "auto" and not is_checkpoint_path(tag):
        pp = merge_preprocess_dict(pp, open_clip.get_pretrained_cfg(arch, tag) or {})
    pp["size"] = model_config(arch)["vision_cfg"].get("image_size", pp["size"])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}


def load_lines(directory: str | Path, resolve: bool = True) -> list[str]:
    """The two lines of Python that load an export with open_clip alone."""
    d = Path(directory).resolve() if resolve else directory
    return ["import open_clip",
            f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{d}"); '
            f'tokenizer = open_clip.get_tokenizer("local-dir:{d}")']


def save_open_clip(directory: str | Path, cfg: ExperimentConfig, state_dict: Mapping[str, torch.Tensor], *,
                   run: str = "", source: str = "") -> Path:
    """Write ``state_dict`` (from :func:`deployed_state`) in open_clip's local format (module docstring) and return
    the directory. Every file is written atomically and ``fomo_ray.json`` last, so a directory without it is
    incomplete. Refuses a non-empty directory that is not an earlier export (open_clip would pick up any other
    weights file in it); an earlier export is replaced file by file."""
    from fomo_ray import __version__
    from fomo_ray.core.assembly import run_name
    from fomo_ray.atomic import torch_save, write_json
    from fomo_ray.models.backbones import MODEL_CONFIG_DIR
    from fomo_ray.config import to_dict

    d = Path(directory)
    previous = _previous_export(d)
    arch = cfg.backbone.name
    quick_gelu = trained_quick_gelu(cfg)
    model_cfg = dict(model_config(arch))
    if quick_gelu:  # open_clip rebuilds the export from model_cfg alone: it must say how the weights were trained
        model_cfg["quick_gelu"] = True
    for stale in previous:
        (d / stale).unlink(missing_ok=True)
    torch_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, d / WEIGHTS_FILE)
    write_json(d / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(cfg)}, indent=2)
    files = [WEIGHTS_FILE, CONFIG_FILE]
    if (MODEL_CONFIG_DIR / f"{arch}.json").is_file():  # open_clip.add_model_config(d) then knows it by name
        write_json(d / f"{arch}.json", model_cfg, indent=2)
        files.append(f"{arch}.json")
    files += _save_hf_tokenizer(arch, model_cfg, d)
    write_json(d / INFO_FILE, {
        "format": EXPORT_FORMAT, "arch": arch, "fomo_ray_version": __version__, "run": run or run_name(cfg),
        "config_hash": cfg.config_hash(), "method": cfg.method.name, "pretrained": cfg.backbone.pretrained,
        "quick_gelu": quick_gelu,
        "source": source, "files": files, "load": load_lines("<this directory>", resolve=False),
        "config": to_dict(cfg)}, indent=2)
    return d


def _save_hf_tokenizer(arch: str, model_cfg: Mapping[str, Any], d: Path) -> list[str]:
    """``open_clip.get_tokenizer("local-dir:DIR")`` reads a Hugging Face tokenizer (e.g. SigLIP's) from DIR itself, so
    it is saved there, as open_clip's hub export does; the CLIP SimpleTokenizer ships with open_clip and needs none.
    Returns the files written."""
    import open_clip

    if not model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        return []
    before = {p.name for p in d.iterdir()}
    try:
        open_clip.get_tokenizer(arch).save_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - offline without a warm cache, a hub error: name the tokenizer
        raise ExportError(f"could not save the Hugging Face tokenizer of '{arch}' into {d}: {e}") from e
    return sorted({p.name for p in d.iterdir() if p.is_file()} - before)


def _previous_export(d: Path) -> list[str]:
    """Files of an earlier export in ``d`` to remove before writing (none for a new or empty directory)."""
    if d.exists() and not d.is_dir():
        raise ExportError(f"export target {d} exists and is not a directory")
    if not d.is_dir() or not any(d.iterdir()):
        return []
    if not (d / INFO_FILE).is_file():
        raise ExportError(f"export target {d} is not empty and holds no earlier export ({INFO_FILE}); choose a new "
                          f"or empty directory")
    return [f for f in json.loads((d / INFO_FILE).read_text()).get("files", []) if "/" not in f] + [INFO_FILE]


# --------------------------------------------------------------------------------------------------- sources
@dataclass
class _Found:
    """What a source resolved to: an export directory, or a run's config and task-end loop state."""

    source: str
    export_dir: Path | None = None
    cfg: ExperimentConfig | None = None
    state: Any = None
    run: str = ""


@dataclass(frozen=True)
class DeployedModel:
    """A run's deployed model, by name: ``.model`` (open_clip, eval mode), ``.preprocess`` (its evaluation image
    transform) and ``.tokenizer``. Not a tuple: open_clip's ``create_model_and_transforms`` returns ``(model,
    train_transform, eval_transform)``, so unpacking three values by position would silently take the wrong one."""
    model: nn.Module
    preprocess: Any
    tokenizer: Any

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("load_model returns a DeployedModel: use its .model, .preprocess and .tokenizer (by position "
                        "they would read like open_clip's (model, train_transform, eval_transform), and do not)")


def load_model(source: str | Path, device: str | torch.device = "cpu", *, tracking_uri: str | None = None,
               config: str | Path | ExperimentConfig | None = None) -> DeployedModel:
    """A run's deployed model (:class:`DeployedModel`): the open_clip model in eval mode on ``device``, its
    evaluation image transform and its tokenizer.

    ``source``: an export directory (:func:`save_open_clip`); a ``fomo-ray run`` directory (``config.json`` and
    ``state/loop_state.pt``); a directory holding ``loop_state.pt`` (or that file), whose config is ``config`` or a
    ``config.json`` beside it or one level up; an MLflow run id or ``runs:/<id>[/path]`` with ``tracking_uri`` (else
    ``MLFLOW_TRACKING_URI``), read from its ``model/`` artifact, else its ``checkpoints/final`` state and its config
    (the ``config.json`` there, else the run's params)."""
    import open_clip

    with _resolved(source, tracking_uri, config) as found:
        if found.export_dir is not None:
            name = f"local-dir:{found.export_dir}"
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(name)
            except (RuntimeError, ValueError, OSError) as e:
                raise ExportError(f"open_clip could not load the export {found.export_dir}: {e}") from e
            tokenizer = open_clip.get_tokenizer(name)
        else:
            model, preprocess, tokenizer = _open_clip_model(found.cfg, deployed_state(found.cfg, found.state))
    return DeployedModel(model.to(device).eval(), preprocess, tokenizer)


def export(source: str | Path, out_dir: str | Path, *, tracking_uri: str | None = None,
           config: str | Path | ExperimentConfig | None = None) -> Path:
    """Write the deployed model of ``source`` (any source :func:`load_model` takes) to ``out_dir`` in open_clip's
    format; returns ``out_dir``. An export (e.g. an MLflow ``model/`` artifact) is copied as it is."""
    out = Path(out_dir)
    with _resolved(source, tracking_uri, config) as found:
        if found.export_dir is not None:
            if out.resolve() == found.export_dir.resolve():
                return out
            files = [f.name for f in found.export_dir.iterdir() if f.is_file()]
            for stale in _previous_export(out):
                (out / stale).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            for name in sorted(files, key=lambda n: n == INFO_FILE):  # the completeness marker last
                shutil.copyfile(found.export_dir / name, out / f".{name}.tmp")
                os.replace(out / f".{name}.tmp", out / name)
            return out
        return save_open_clip(out, found.cfg, deployed_state(found.cfg, found.state), run=found.run,
                              source=found.source)


def _open_clip_model(cfg: ExperimentConfig, state_dict: Mapping[str, torch.Tensor]) -> tuple[nn.Module, Any, Any]:
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from fomo_ray.models.backbones import quiet_random_init

    model_config(cfg.backbone.name)  # registers tiny archs
    with quiet_random_init():  # the deployed weights are loaded next
        model = open_clip.create_model(cfg.backbone.name, pretrained=None, force_quick_gelu=trained_quick_gelu(cfg))
    model.load_state_dict(state_dict, strict=True)
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_config(cfg)), is_train=False)
    return model, preprocess, open_clip.get_tokenizer(cfg.backbone.name)


@contextlib.contextmanager
def _resolved(source: str | Path, tracking_uri: str | None,
              config: str | Path | ExperimentConfig | None) -> Iterator[_Found]:
    """Resolve ``source`` (see :func:`load_model`); MLflow artifacts live in a temporary directory for the block."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        yield _local(path, text, config)
        return
    m = _RUN_ID.match(text)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if m and uri:
        with tempfile.TemporaryDirectory(prefix="fomo_export_") as tmp:
            yield _from_mlflow(m.group(1), m.group(2) or "", uri, Path(tmp), text, config)
        return
    hint = (" (it looks like an MLflow run id: pass tracking_uri= / --tracking-uri)" if m else
            ": expected an export directory, a fomo-ray run directory, a sweep's trial directory, a loop_state.pt "
            "or its directory, or an MLflow run id with a tracking URI")
    raise ExportError(f"no such file or directory: {text}{hint}")


def mlflow_run_id(source: str | Path) -> str:
    """The MLflow run id ``source`` names (a bare id or ``runs:/<id>[/path]``), or "" when it names none."""
    m = _RUN_ID.match(str(source))
    return m.group(1) if m and not Path(str(source)).expanduser().exists() else ""


def is_deployed_form(directory: str | Path) -> bool:
    """True for a final checkpoint trimmed to its export (``model/`` with open_clip's files, no loop state)."""
    d = Path(directory) / DEPLOYED_DIR
    return (d / CONFIG_FILE).is_file() and (d / WEIGHTS_FILE).is_file()


def newest_checkpoint(trial_dir: Path) -> Path | None:
    """The newest Ray checkpoint holding a loop state, or its export (an ended trial's, ``ray.keep_after_run``), in a
    sweep's trial directory: a Train run's final one (``final_*``), else the last of Tune's ``checkpoint_NNNNNN`` or
    Train's ``cursor_tTTT_sSSSSSSS`` (both sort by name); None when there is none."""
    from fomo_ray.core.checkpoint import LOOP_STATE_FILE

    for pattern in ("final_*", "checkpoint_*", "cursor_*"):
        found = sorted(d for d in trial_dir.glob(pattern) if (d / LOOP_STATE_FILE).is_file() or is_deployed_form(d))
        if found:
            return found[-1]
    return None


def _local(path: Path, source: str, config: str | Path | ExperimentConfig | None) -> _Found:
    from fomo_ray.core.checkpoint import LOOP_STATE_FILE

    if path.is_dir() and not (path / CONFIG_FILE).is_file() and is_deployed_form(path):
        path = path / DEPLOYED_DIR  # a final checkpoint trimmed to its export (ray.keep_after_run: deployed)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        if not (path / WEIGHTS_FILE).is_file():
            raise ExportError(f"export directory {path} has no {WEIGHTS_FILE}")
        return _Found(source, export_dir=path)
    if path.is_file():
        if path.name != LOOP_STATE_FILE:
            raise ExportError(f"{path} is not a {LOOP_STATE_FILE} (or a directory holding one)")
        state_dir = path.parent
    elif (path / LOOP_STATE_FILE).is_file():
        state_dir = path
    elif (path / "state" / LOOP_STATE_FILE).is_file():  # a `fomo-ray run` output directory
        state_dir = path / "state"
    elif (newest := newest_checkpoint(path)) is not None:  # a sweep's trial directory (Tune) or Train run
        if not (newest / LOOP_STATE_FILE).is_file():  # an ended trial's final checkpoint, trimmed to its export
            return _Found(source, export_dir=newest / DEPLOYED_DIR)
        state_dir = newest
    else:
        raise ExportError(f"{path} holds no export ({CONFIG_FILE} + {WEIGHTS_FILE}), no {LOOP_STATE_FILE}, no "
                          f"state/{LOOP_STATE_FILE} (a fomo-ray run directory) and no checkpoint_*/{LOOP_STATE_FILE} "
                          f"(a sweep's trial directory)")
    state = _read_state(state_dir)
    if config is None:
        candidates = [state_dir / "config.json", state_dir.parent / "config.json"]
        config = next((c for c in candidates if c.is_file()), None)
        if config is None:
            raise ExportError(f"found the loop state of run '{state.run}' in {state_dir} but no config.json beside it "
                              f"or in {state_dir.parent}: pass the run's config (config= / --config: its config.json "
                              f"or YAML with the same overrides)")
    return _Found(source, cfg=_config(config), state=state, run=state.run)


def _read_state(state_dir: Path) -> Any:
    from fomo_ray.core.checkpoint import load_state

    try:
        return load_state(state_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"cannot read the loop state in {state_dir}: {e}") from e


def _config(config: str | Path | ExperimentConfig) -> ExperimentConfig:
    from fomo_ray.config import ConfigError, load_config

    if isinstance(config, ExperimentConfig):
        return config
    try:
        return load_config(config)
    except ConfigError as e:
        raise ExportError(f"run config {config}: {e}") from e


def config_from_params(params: Mapping[str, str]) -> ExperimentConfig:
    """The config a trial logged as MLflow params (``cfg.flat()``, values as strings, lists comma-joined), typed by
    each key's default; keys this version does not know are ignored and missing keys take their defaults."""
    from fomo_ray.config import field_docs, load_config

    typed: dict[str, Any] = {}
    for key, (default, _) in field_docs().items():
        if key not in params:
            continue
        raw = params[key]
        if default is None:  # an Optional setting (backbone.quick_gelu): None, or the value's own text
            typed[key] = None if raw in ("None", "") else raw == "True" if raw in ("True", "False") else raw
        elif isinstance(default, bool):
            typed[key] = raw == "True"
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else str
            typed[key] = [kind(x) for x in raw.split(",")] if raw else []
        else:  # int, float, str
            typed[key] = type(default)(raw)
    return load_config(None, typed)


def _from_mlflow(run_id: str, sub: str, uri: str, tmp: Path, source: str,
                 config: str | Path | ExperimentConfig | None) -> _Found:
    from fomo_ray.tracking import writer

    try:
        if sub:  # runs:/<id>/<path>: that artifact, as a local source
            got = writer.download_run_artifacts(uri, run_id, sub, tmp)
            if got is None:
                raise ExportError(f"MLflow run {run_id} at {uri} has no artifact '{sub}'")
            found = _local(got, source, config if config is not None else _params_config(uri, run_id, got))
            return found
        got = writer.download_run_artifacts(uri, run_id, MODEL_ARTIFACT, tmp)
        if got is not None:
            return _Found(source, export_dir=got)
        got = writer.download_run_artifacts(uri, run_id, STATE_ARTIFACT, tmp)
        if got is None:
            raise ExportError(f"MLflow run {run_id} at {uri} has neither a '{MODEL_ARTIFACT}/' nor a "
                              f"'{STATE_ARTIFACT}/' artifact (was it a finished trial with tracking.log_checkpoints "
                              f"on?)")
        return _local(got, source, config if config is not None else _params_config(uri, run_id, got))
    except writer.TrackingError as e:
        raise ExportError(str(e)) from e


def _params_config(uri: str, run_id: str, local: Path) -> ExperimentConfig | None:
    """The config of an MLflow run: ``config.json`` in its downloaded state directory (``_local`` reads it), else its
    params."""
    from fomo_ray.tracking import writer
    from fomo_ray.config import ConfigError

    if (local / "config.json").is_file() or (local / CONFIG_FILE).is_file():
        return None
    try:
        return config_from_params(writer.run_params(uri, run_id))
    except ConfigError as e:
        raise ExportError(f"MLflow run {run_id} at {uri}: its params do not form a valid config: {e}") from e
