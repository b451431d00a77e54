"""CLIP backbones: any open_clip architecture plus three tiny, CPU-trainable ones.

``create_backbone(name, pretrained)`` builds an open_clip ``CLIP`` (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision"; implementation: open_clip, Ilharco et al. 2021) and returns it with
its tokenizer and image preprocessing numbers. ``pretrained`` is one of

- ``""``: random initialisation (what the from-scratch base pretraining starts from);
- an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...): downloaded by open_clip (needs the network;
  with ``HF_HUB_OFFLINE=1`` it fails fast with a clear message);
- a local checkpoint file: a plain state dict, a training-style ``{"state_dict": ...}`` dict (``module.`` prefixes
  from DDP are stripped), a ``.safetensors`` file, or OpenAI's original TorchScript ``.pt`` (its tensors only).
  Pickles are read with ``torch.load(weights_only=True)`` so a checkpoint can never execute code; keys and shapes
  are checked against the architecture before loading.

**Built as the weights were trained.** OpenAI's CLIPs and several later ones (DFN, MetaCLIP, some LAION-400M tags)
were trained with QuickGELU (``x * sigmoid(1.702 x)``), the plain architecture configs use ``nn.GELU``, and
``open_clip.create_model(arch, pretrained=tag)`` only warns about the difference. :func:`resolve_quick_gelu` takes
the activation from open_clip's own pretrained registry for a tag (``get_pretrained_cfg(arch, tag)["quick_gelu"]``,
the only architecture flag it carries; the rest is preprocessing), from the ``meta`` of a checkpoint written by
:func:`save_checkpoint` (which records it), from OpenAI's TorchScript (always QuickGELU), or from what the user
declares (``backbone.quick_gelu`` or an open_clip ``*-quickgelu`` architecture) for a file that records nothing. A
declaration that contradicts the weights' own record is refused.

The tiny architectures live in ``fomo_ray/models/model_configs/*.json`` and are registered with
``open_clip.factory.add_model_config``. They keep open_clip's ``vocab_size=49408`` (the SimpleTokenizer's range, which
ships with the wheel and works offline) and a 32-token text context (FiF-mini captions are < 20 tokens):

=============  =====  ======  =====  =====  ==========================================================
name           width  layers  patch  image  why
=============  =====  ======  =====  =====  ==========================================================
fomo-tiny-s    128    2       8      32     the default; ~400-650 samples/s fwd+bwd on 2 CPU cores
fomo-tiny-m    192    3       4      32     ~4x the tokens and ~2x the width: the model-size study's middle
fomo-tiny-l    256    4       4      32     the largest that still trains on a 2-core CPU
=============  =====  ======  =====  =====  ==========================================================
(width/layers are shared by both towers; ``embed_dim`` = width; vision heads = width/64.)
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch

from fomo_ray.atomic import torch_save
from fomo_ray.retry import ATTEMPTS, TransientError, with_backoff

log = logging.getLogger(__name__)
T = TypeVar("T")
MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
TINY_ARCHS: tuple[str, ...] = ("fomo-tiny-s", "fomo-tiny-m", "fomo-tiny-l")  # increasing size
DEFAULT_ARCH = "fomo-tiny-s"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class BackboneError(ValueError):
    """An architecture name, pretrained tag or checkpoint file is invalid; the message names the culprit."""


def fetch(call: Callable[[], T], what: str) -> T:
    """``call()`` that may download (weights, a tokenizer), retried with back-off on network trouble
    (``fomo_ray.retry``); offline (``HF_HUB_OFFLINE=1``) a failure is final at once."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return with_backoff(call, what, attempts=1 if offline else ATTEMPTS, log=log.warning)


@dataclass
class Backbone:
    """A CLIP model with what is needed to feed it: tokenizer, image size and normalisation, text context."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int
    precision: str = "fp32"  # resolved autocast dtype name ("fp32" means no autocast)
    quick_gelu: bool = False  # the activation the model was built with (resolve_quick_gelu); recorded with the weights

    def autocast(self, device: str | torch.device | None = None):
        """Autocast context for this backbone's precision on ``device`` (default: where the model lives)."""
        dev = torch.device(device) if device is not None else next(self.model.parameters()).device
        return autocast_context(dev, self.precision)


# --------------------------------------------------------------------------------------------------- registry
def register_tiny_archs() -> None:
    """Add ``fomo_ray/models/model_configs`` to open_clip's registry (idempotent: open_clip rescans on every add)."""
    import open_clip

    if not all(a in open_clip.list_models() for a in TINY_ARCHS):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def available_archs() -> list[str]:
    """Every architecture ``create_backbone`` accepts: the tiny ones first, then open_clip's built-ins."""
    import open_clip

    register_tiny_archs()
    return list(TINY_ARCHS) + [m for m in open_clip.list_models() if m not in TINY_ARCHS]


def _check_arch(name: str) -> None:
    valid = available_archs()
    if name in valid:
        return
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    # the whole open_clip list is ~150 names (a 2,700-character line): counted, with where to list it
    raise BackboneError(
        f"unknown architecture '{name}'.{hint} Tiny (CPU) architectures: {', '.join(TINY_ARCHS)}; plus "
        f"{len(valid) - len(TINY_ARCHS)} open_clip architectures, e.g. ViT-B-16, ViT-L-14 (all: python -c "
        f"\"import open_clip; print(open_clip.list_models())\")"
    )


# --------------------------------------------------------------------------------------------------- precision
def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` -> bf16 on CUDA devices that support it, else fp32 (CPU autocast would slow tiny models down)."""
    if precision not in PRECISIONS:
        raise BackboneError(f"precision '{precision}' is not one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` for bf16/fp16, a no-op context for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------- checkpoints
def is_checkpoint_path(pretrained: str) -> bool:
    """A local file was meant if it exists or looks like a path; otherwise it is an open_clip tag."""
    return os.path.isfile(pretrained) or os.sep in pretrained or pretrained.endswith(
        (".pt", ".pth", ".bin", ".ckpt", ".safetensors"))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (see :func:`read_checkpoint`)."""
    return read_checkpoint(path)[0]


#: what a checkpoint file may be; named in the error for anything else
CHECKPOINT_FORMATS = ("a state dict saved with torch.save (plain, or as {'state_dict': ...})", ".safetensors",
                      "OpenAI's original TorchScript .pt")
#: entries of OpenAI's TorchScript state dicts that are not parameters (open_clip drops them the same way)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint file: a plain state dict, ``{"state_dict": ..., "meta": ...}`` (what
    :func:`save_checkpoint` writes; ``meta`` may record ``quick_gelu``), a ``.safetensors`` file, or OpenAI's
    TorchScript ``.pt`` (meta ``{"quick_gelu": True, "format": "openai_torchscript"}``).

    Pickled files are loaded with ``weights_only=True``: a file holding arbitrary Python objects is refused
    (it could run code on load) with an error naming the file. A TorchScript archive is TorchScript, not a pickle of
    Python objects: it is loaded with ``torch.jit.load`` and only its tensors are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"checkpoint file not found: {path}")
    meta: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise BackboneError(f"checkpoint {path} is not a valid .safetensors file: {e}") from e
    elif _is_torchscript(path):
        obj, meta = _read_torchscript(path), {"quick_gelu": True, "format": "openai_torchscript"}
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackboneError(
                f"checkpoint {path} is not a plain tensor file: torch.load(weights_only=True) refused it "
                f"({first}). Supported: {'; '.join(CHECKPOINT_FORMATS)}."
            ) from e
        except (RuntimeError, EOFError, OSError) as e:
            raise BackboneError(f"checkpoint {path} could not be read as a torch file: {e}. Supported: "
                                f"{'; '.join(CHECKPOINT_FORMATS)}.") from e
    if isinstance(obj, Mapping) and "state_dict" in obj:
        meta = dict(obj.get("meta") or {}) if isinstance(obj.get("meta"), Mapping) else {}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise BackboneError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise BackboneError(f"checkpoint {path}: entries that are not tensors: {bad[:5]}")
    return {strip_wrappers(k): v for k, v in obj.items()}, meta


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` a checkpoint file records ({} for files that record none); tensors are memory-mapped, not read."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return {}
    if _is_torchscript(path):
        return {"quick_gelu": True, "format": "openai_torchscript"}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable files are reported by read_checkpoint when the model is built
        return {}
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding compiled code (``*/code/``) beside its tensors."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """OpenAI's released ``.pt`` files are TorchScript modules in fp16; their state dict has open_clip's key layout
    (open_clip mirrors OpenAI's modules) plus three non-parameter entries."""
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - name the file and the supported formats
        raise BackboneError(f"checkpoint {path} is a TorchScript archive torch.jit.load could not read ({e}). "
                            f"Supported: {'; '.join(CHECKPOINT_FORMATS)}.") from e
    return {k: (v.float() if v.is_floating_point() else v) for k, v in module.state_dict().items()
            if k not in _OPENAI_EXTRA_KEYS}


def strip_wrappers(key: str) -> str:
    """Drop prefixes added by DDP (``module.``) and torch.compile (``_orig_mod.``)."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def state_dict_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Missing, unexpected and mis-shaped keys of ``state`` relative to ``model`` (empty lists = compatible)."""
    own = model.state_dict()
    return {
        "missing": sorted(k for k in own if k not in state),
        "unexpected": sorted(k for k in state if k not in own),
        "mis-shaped": sorted(
            f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)})"
            for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
        ),
    }


def load_checkpoint(model: torch.nn.Module, path: str | Path, arch: str = "") -> None:
    """Load a checkpoint file into ``model`` strictly; a mismatch names the keys and the file."""
    state = read_state_dict(path)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        # open_clip has both scalar and 1-element logit_scale variants; same value, different shape
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    own = model.state_dict()
    for name, _ in model.named_buffers():  # non-persistent buffers (attention masks) are rebuilt by the architecture;
        if name not in own:                # TorchScript archives carry them like parameters
            state.pop(name, None)
    problems = {k: v for k, v in state_dict_mismatch(model, state).items() if v}
    if problems:
        parts = [f"{kind} keys ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for kind, keys in problems.items()]
        raise BackboneError(
            f"checkpoint {path} does not match architecture '{arch or type(model).__name__}': " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def save_checkpoint(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: str | Path,
                    meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"state_dict": ..., "meta": ...}`` atomically (temp file + rename); readable by ``read_state_dict``.

    ``meta`` must be plain data (str/int/float/bool/lists/dicts) so the file stays ``weights_only``-loadable. A
    :class:`Backbone`'s activation goes in as ``meta["quick_gelu"]`` (:func:`base_meta`), so the file is rebuilt the
    way it was trained when it is loaded later.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else dict(model_or_state)
    payload = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()}, "meta": dict(meta or {})}
    return torch_save(payload, path)


# --------------------------------------------------------------------------------------------------- factory
def tokenizer_for(name: str) -> tuple[Callable[..., torch.Tensor], int]:
    """``(tokenizer, context_length)`` exactly as :func:`create_backbone` gives them for ``name``, without building the
    model: preparation tokenises a benchmark's captions once with it, and the run finds them by the same key."""
    import open_clip

    _check_arch(name)
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    context_length = int(text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH))
    try:
        return fetch(lambda: open_clip.get_tokenizer(name, context_length=context_length),
                     f"the tokenizer of '{name}'"), context_length
    except TransientError:
        raise
    except Exception as e:  # noqa: BLE001 - HF tokenizers need the hub or a warm cache; name the model either way
        offline = " (HF_HUB_OFFLINE=1: Hugging Face tokenizers need a warm cache)" if os.environ.get(
            "HF_HUB_OFFLINE") == "1" else ""
        raise BackboneError(f"could not load the tokenizer of '{name}'{offline}: {e}") from e


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" while a model whose weights are
    loaded right after is built (open_clip logs it on the root logger)."""
    quiet = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def arch_quick_gelu(name: str) -> bool:
    """Whether architecture ``name``'s own config builds QuickGELU (open_clip's ``*-quickgelu`` variants do)."""
    import open_clip

    register_tiny_archs()
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))


def resolve_quick_gelu(name: str, pretrained: str = "", declared: bool | None = None) -> bool:
    """The activation the weights ``pretrained`` of ``name`` were trained with: True = QuickGELU, False = GELU.

    From, in order: open_clip's pretrained registry for a tag; the checkpoint's recorded ``meta["quick_gelu"]``
    (:func:`save_checkpoint` records it; OpenAI's TorchScript is always QuickGELU); else ``declared``
    (``backbone.quick_gelu``); else the architecture's own config. A ``declared`` value or a ``*-quickgelu``
    architecture that contradicts the weights' record raises :class:`BackboneError`: the run would compute with
    another activation than the weights were trained with.
    """
    import open_clip

    arch = arch_quick_gelu(name)
    recorded, source = None, ""
    if pretrained and pretrained != "auto" and not is_checkpoint_path(pretrained):
        recorded = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        source = f"open_clip's pretrained config of '{name}/{pretrained}'"
    elif pretrained and pretrained != "auto":
        meta = checkpoint_meta(pretrained)
        if "quick_gelu" in meta:
            recorded, source = bool(meta["quick_gelu"]), f"checkpoint {pretrained} (its meta)"
    for value, what in ((declared, "backbone.quick_gelu"), (arch or None, f"architecture '{name}'")):
        if recorded is not None and value is not None and value != recorded:
            raise BackboneError(
                f"{what} says {'QuickGELU' if value else 'GELU'}, but {source} says the weights were trained with "
                f"{'QuickGELU' if recorded else 'GELU'}: drop the setting (the weights' record decides) or use other "
                f"weights")
    if recorded is not None:
        return recorded
    if declared is not None and arch and not declared:
        raise BackboneError(f"backbone.quick_gelu=false contradicts architecture '{name}' (a -quickgelu config); use "
                            f"'{name.removesuffix('-quickgelu')}' for GELU")
    return bool(declared) if declared is not None else arch


def run_quick_gelu(name: str, pretrained: str, declared: bool | None = None) -> bool | None:
    """The activation a run of ``backbone.name/pretrained/quick_gelu`` builds, read without building it (for
    records: MLflow tags, exports); ``auto`` is a tiny base (GELU unless declared). None when it cannot be known: a
    base file that is gone and no declaration."""
    if pretrained and pretrained != "auto" and is_checkpoint_path(pretrained) and not Path(pretrained).is_file():
        return declared if declared is not None else (arch_quick_gelu(name) if name in TINY_ARCHS else None)
    return resolve_quick_gelu(name, "" if pretrained == "auto" else pretrained, declared)


def activation_tags(cfg: Any) -> dict[str, str]:
    """MLflow's ``fomo_ray.quick_gelu`` tag of a run of ``cfg``: true / false (QuickGELU / GELU) as its model is
    built, or unknown; the config itself says null when the weights decide."""
    found = run_quick_gelu(cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.quick_gelu)
    return {"fomo_ray.quick_gelu": "unknown" if found is None else str(found).lower()}


def base_meta(backbone: "Backbone") -> dict[str, Any]:
    """What a checkpoint of ``backbone`` must record to be rebuilt as trained (merged into ``save_checkpoint``'s
    meta): the architecture and its activation."""
    return {"arch": backbone.name, "quick_gelu": bool(backbone.quick_gelu)}


def _build_device() -> str:
    """Where open_clip builds a model: "meta" inside ``with torch.device("meta")`` (shapes without data, for
    ``budgets.step_measure.unfilled``), else the CPU (weights are loaded there, then moved)."""
    return "meta" if torch.get_default_device().type == "meta" else "cpu"


def create_backbone(name: str, pretrained: str = "", device: str | torch.device = "cpu",
                    precision: str = "auto", quick_gelu: bool | None = None) -> Backbone:
    """Build architecture ``name`` with weights from ``pretrained`` (tag, checkpoint file or '' for random init).

    Weights stay fp32 (master weights for training); ``precision`` only selects the autocast dtype that
    ``Backbone.autocast`` uses. The activation is the one the weights were trained with
    (:func:`resolve_quick_gelu`; ``quick_gelu`` is the user's declaration, ``backbone.quick_gelu``).
    """
    import open_clip

    _check_arch(name)
    resolved = resolve_precision(precision, device)
    qg = resolve_quick_gelu(name, pretrained, quick_gelu)
    build = _build_device()
    if pretrained and is_checkpoint_path(pretrained):
        with quiet_random_init():  # our checkpoint is loaded next: open_clip's "initialized randomly" is untrue
            model = open_clip.create_model(name, pretrained=None, device="cpu", force_quick_gelu=qg)
        load_checkpoint(model, pretrained, arch=name)
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise BackboneError(
                f"'{pretrained}' is neither a checkpoint file nor an open_clip pretrained tag of '{name}' "
                f"(tags: {', '.join(tags) or 'none'})")
        try:  # a network hiccup is retried with back-off, then raised as TransientError (the trial is retried)
            model = fetch(lambda: open_clip.create_model(name, pretrained=pretrained, device="cpu",
                                                         force_quick_gelu=qg), f"open_clip weights '{name}/{pretrained}'")
        except RuntimeError as e:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise BackboneError(
                f"could not fetch open_clip weights '{name}/{pretrained}'"
                f"{' (HF_HUB_OFFLINE=1: tags need the network or a warm cache)' if offline else ''}: {e}") from e
    else:  # built on the meta device, without its random fills, inside ``with torch.device("meta")`` (measuring)
        model = open_clip.create_model(name, pretrained=None, device=build, force_quick_gelu=qg)
    if build != "meta":
        model = model.to(device)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    context_length = int(model.context_length)
    return Backbone(
        model=model,
        tokenizer=fetch(lambda: open_clip.get_tokenizer(name, context_length=context_length),
                        f"the tokenizer of '{name}'"),
        name=name,
        image_size=int(size),
        mean=tuple(float(x) for x in pp["mean"]),
        std=tuple(float(x) for x in pp["std"]),
        context_length=context_length,
        precision=resolved,
        quick_gelu=qg,
    )
