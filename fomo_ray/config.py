"""One typed, frozen config tree for a continual-pretraining experiment.

Built from YAML plus dotted ``key=value`` overrides::

    cfg = load_config("experiments/configs/default.yaml", ["method.name=ema_merge", "optimizer.lr=1e-4"])
    cfg.flat()   # {"method.name": "ema_merge", "optimizer.lr": 0.0001, ...}  (for Ray Tune / MLflow params)

Every field has a default and a ``doc`` saying why it has that value. Unknown keys and wrong types fail at
load time with a :class:`ConfigError` naming the dotted key and suggesting the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the dotted key."""


def F(default: Any, doc: str) -> Any:
    """A config field with its default and a one-line reason (kept in ``metadata['doc']``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in the frozen config; use a tuple")
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


# --------------------------------------------------------------------------------------------------- sections
#: the options of `fomo-ray sweep` (its flags, dashes for underscores) and of ``fomo_ray.sweep`` (keywords) that set a
#: config key of every trial: one table for both (values are typed by argparse or Python, validated by the tree)
FLAG_KEYS: dict[str, str] = {
    "output_dir": "output_dir",
    "data_root": "data.root",
    "benchmark": "data.benchmark",
    "backbone": "backbone.name",
    "pretrained": "backbone.pretrained",
    "num_tasks": "stream.num_tasks",
    "address": "ray.address",
    "gpus_per_trial": "ray.gpus_per_worker",
    "cpus_per_trial": "ray.cpus_per_worker",
    "workers_per_trial": "ray.num_workers",
    "max_concurrent": "ray.max_concurrent_trials",
    "storage_path": "ray.storage_path",
    "tracking_uri": "tracking.uri",
}

def short_key(key: str) -> str:
    """``method.merge.weight`` -> ``weight``; ``method.name`` -> ``method`` (a bare "name" would be ambiguous)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


@dataclass(frozen=True)
class DataConfig:
    benchmark: Literal["fifmini", "fif"] = F("fifmini", "the embedded procedural benchmark runs anywhere; 'fif' selects converted real FiF data")
    root: str = F("data/fifmini", "directory holding the converted benchmark (manifest.json + .beton files); relative paths resolve against the working directory (see resolved())")
    pool: str = F("", "directory of a converted pretraining pool; empty = the benchmark's own pool")
    generator_seed: int = F(0, "seed of the FiF-mini generator; the content hash changes with it")
    scale: float = F(1.0, "FiF-mini size multiplier (1.0 = 20k pool images); tests use 0.05 to stay fast")
    image_size: int = F(32, "FiF-mini's stored image size (`fomo-ray prepare fifmini --image-size`); 32 px keeps tiny CPU models fast. The backbone's input size must equal the stored size (fomo-tiny-* 32, ViT-B-16 224): set both, or data.allow_resize")
    allow_resize: bool = F(False, "let a backbone whose input size differs from the stored image size of the benchmark (or of data.pool) resize every image to the backbone's size on the fly (training crops and evaluation images alike); off, such a run is refused, since e.g. 32 px images upsampled for a 224 px ViT are not the data its zero-shot numbers mean: store the data at the backbone's size instead (`fomo-ray prepare ... --image-size N`)")
    loader: Literal["ffcv", "memory"] = F("ffcv", "FFCV loaders feed accelerators; 'memory' decodes whole splits once into each process's RAM (machines without FFCV, e.g. the GPU check) and refuses a split that would take more than 25% of the machine's RAM (the real FiF test sets need 100+ GB)")
    num_workers: int = F(0, "threads of the compiled decode/crop stage (and of FFCV's evaluation loaders); 0 = follow the run's CPUs: ray.cpus_per_worker in a Ray trial (at least 1), torch's thread count (the machine's cores, or OMP_NUM_THREADS) in a local `fomo-ray run`; one H100 at 40% MFU needs about 2 decode cores for ViT-B/16, so reserve them with ray.cpus_per_worker")
    prefetch: int = F(2, "training batches built ahead on a background thread (pinned memory and async copies on CUDA); 0 builds each batch when the step needs it")
    prepare_if_missing: bool = F(True, "build FiF-mini automatically when a run needs it and it is missing")


@dataclass(frozen=True)
class StreamConfig:
    file: str = F("", "stream JSON (list of 'DATASET+++classname'); empty = the benchmark's stream for `ordering`")
    ordering: str = F("random", "which shipped ordering to use when `file` is empty (random, dataset_incremental, ...)")
    num_tasks: int = F(4, "T, the number of tasks the stream is cut into (paper: 20; 4 keeps the CPU default short)")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = F("fomo-tiny-s", "open_clip architecture; fomo-tiny-* are CPU-sized registered configs, e.g. ViT-B-16 for real runs")
    pretrained: str = F("auto", "open_clip tag, a local checkpoint file, 'auto' (cached CPU-pretrained base for tiny archs) or '' (random init)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = F("auto", "autocast dtype; auto = bf16 on GPUs that support it, fp32 on CPU")
    quick_gelu: Optional[bool] = F(None, "activation: null = as the weights were trained (a tag's open_clip pretrained config, a checkpoint's recorded meta; GELU for a file that records nothing); true/false declares it for such a file (OpenAI, DFN and MetaCLIP weights use QuickGELU)")
    grad_checkpointing: bool = F(False, "recompute each transformer block's activations in the backward instead of keeping them (open_clip's set_grad_checkpointing, non-reentrant torch.utils.checkpoint): activation memory drops to the blocks' inputs plus one block, the step costs about one more forward (the budget charges it), the gradient is the same; open_clip's ModifiedResNet image tower ignores it")


@dataclass(frozen=True)
class MergeConfig:
    weight: float = F(0.5, "w on the new weights in m_t = w*theta_t + (1-w)*m_{t-1}; paper default 0.5, swept 0.1..0.9")
    operator: str = F("interpolate", "merge operator from merge_ops.OPERATORS (interpolate, ties, dare, ...)")
    init: Literal["previous_deployed", "previous_trained", "zero_shot"] = F("previous_deployed", "TIME init rule: where task t starts training")
    deploy: Literal["ema", "zero_shot_anchor", "all_experts"] = F("ema", "TIME deploy rule: what the operator merges into the deployed model")
    density: float = F(0.2, "TIES/DARE/Breadcrumbs: fraction of task-vector entries kept")
    scale: float = F(1.0, "task-arithmetic lambda on the summed task vectors")
    drop_top: float = F(0.01, "Breadcrumbs: fraction of the largest-magnitude task-vector entries also dropped (outliers)")
    lines_alpha: float = F(-1.0, "LiNeS layer scaling alpha (scale of the first layer); negative disables LiNeS")
    lines_beta: float = F(0.0, "LiNeS beta: lambda_l = alpha + beta*l/(L-1)")
    opcm_alpha: float = F(0.5, "OPCM: energy threshold alpha; the top-r singular pairs of the running merge whose singular values first exceed this fraction of their sum are protected (paper and FusionBench default 0.5)")
    opcm_lambda_rule: Literal["norm", "sqrt_t"] = F("norm", "OPCM: lambda_t that rescales the merged task vector; 'norm' keeps its norm at the mean task-vector norm (the paper's rule), 'sqrt_t' uses sqrt(t), the growth the paper reports for it")
    dop_steps: int = F(200, "DOP: Adam steps per linear layer and merge (FusionBench default 200)")
    dop_lr: float = F(1.0e-4, "DOP: Adam learning rate of the per-layer optimisation (FusionBench default)")
    dop_energy: float = F(0.99999, "DOP: fraction of a task vector's singular-value sum its projection subspaces keep (FusionBench default)")
    dop_ema_beta: float = F(0.999, "DOP: smoothing of the MGDA weight, a <- beta*a + (1-beta)*gamma each step (FusionBench default)")
    dop_alpha: float = F(0.8, "DOP: the smoothed MGDA weight on the previous merge at each layer's first step (FusionBench default)")


@dataclass(frozen=True)
class PeftConfig:
    rank: int = F(4, "adapter rank r; the paper uses 4 and 64")
    alpha: float = F(8.0, "LoRA scaling numerator (scale = alpha/r), peft's usual 2r")
    dropout: float = F(0.0, "adapter dropout; 0 keeps runs deterministic and matches the paper")


@dataclass(frozen=True)
class RegConfig:
    ewc_lambda: float = F(1.0e3, "EWC penalty strength lambda in (lambda/2)*sum F (theta-theta*)^2")
    ewc_gamma: float = F(1.0, "online-EWC decay: F <- gamma*F + F_new")
    ewc_fisher_batches: int = F(4, "batches of task data for the diagonal Fisher pass after each task")
    si_c: float = F(0.5, "SI penalty strength c (the reference default; docs/BENCHMARK.md §Methods)")
    si_xi: float = F(1.0, "SI damping xi (the reference default)")


@dataclass(frozen=True)
class ZsclConfig:
    weight: float = F(1.0, "ZSCL: weight of the distillation term towards the initial model on pool reference data (Zheng et al. 2023 use 1)")
    temperature: float = F(2.0, "ZSCL: distillation temperature T; logits are the initial model's CLIP logits over T, the KL is scaled by T^2")
    ref_size: int = F(64, "ZSCL: pool samples drawn once per run as the reference set (decoded at assembly)")
    ref_batch: int = F(16, "ZSCL: reference samples distilled on per step, cycling through the reference set")
    we_every: int = F(10, "ZSCL weight consolidation: every this many steps the weight ensemble takes the current weights into its running mean; the ensemble is deployed and the next task starts from it; 0 = off")


@dataclass(frozen=True)
class MethodConfig:
    name: str = F("finetune", "method from methods.REGISTRY (finetune, lora, ema_merge, ...)")
    merge: MergeConfig = F(MergeConfig(), "merge-family settings (EMA/ZS/FT/offline merges and TIME triples)")
    peft: PeftConfig = F(PeftConfig(), "LoRA/DoRA/VeRA settings")
    reg: RegConfig = F(RegConfig(), "EWC/SI regulariser settings")
    zscl: ZsclConfig = F(ZsclConfig(), "ZSCL distillation and weight-consolidation settings")


@dataclass(frozen=True)
class MixtureConfig:
    batch_size: int = F(64, "b, samples per step over pool+update+buffer (paper 512; 64 fits 2 CPU cores)")
    pool: float = F(0.33, "lambda_P, share of pretraining-pool replay (paper default)")
    update: float = F(0.34, "lambda_D, share of the current task's data (paper default)")
    buffer: float = F(0.33, "lambda_B, share of replay of past update data (paper default)")
    buffer_policy: Literal["unbounded", "reservoir", "cumulative_exp", "cumulative_equal"] = F("unbounded", "reference: the union of all past task data, uniform; 'reservoir' a uniform sample; TiC-CLIP's bounded 'cumulative_exp' (the newest past task keeps half, the one before a quarter, ...) and 'cumulative_equal' (equal shares)")
    buffer_size: int = F(2000, "capacity of the bounded buffers (ignored by 'unbounded')")


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = F(1.0e-4, "peak AdamW lr (paper 1e-5 for ViT-B/16; tiny from-scratch bases need more)")
    weight_decay: float = F(0.2, "AdamW weight decay (paper value)")
    betas: tuple[float, float] = F((0.9, 0.98), "AdamW betas as in open_clip/CLIP training")
    eps: float = F(1.0e-6, "AdamW epsilon as in open_clip")
    grad_clip: float = F(1.0, "one global grad-norm clip over all trainable params (paper value)")
    exempt_no_decay: bool = F(True, "exempt biases, norms, embeddings and logit_scale from decay, as open_clip")
    accum_steps: int = F(1, "gradient accumulation: each rank's shard of the global batch runs as this many near-equal micro-batches, keeping the whole global batch as in-batch negatives as open_clip's accum_freq (a no-grad pass caches all features, then each micro-batch is re-encoded with gradient against the cached rest): the same loss and gradient, the activation memory of one micro-batch, one more forward per step (the budget charges it); needs mixture.batch_size >= accum_steps x ray.num_workers; refused for BatchNorm towers")


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "cosine", "rsqrt"] = F("cosine", "per-task schedule, restarted each task (paper default cosine)")
    warmup_frac: float = F(0.1, "warmup W = ceil(frac*S) steps")
    min_lr_ratio: float = F(1.0e-3, "cosine floor as a fraction of lr")
    cooldown_frac: float = F(0.1, "rsqrt: linear cooldown over the last fraction of steps")
    meta: Literal["none", "autoregressive_cosine", "autoregressive_rsqrt"] = F("none", "meta-schedule over tasks for each task's peak lr")


@dataclass(frozen=True)
class BudgetConfig:
    total_ft_steps: int = F(240, "full fine-tuning steps over the whole stream; steps_ft(T) = total // T (paper 28,400)")
    mode: Literal["maf", "equal_steps"] = F("maf", "maf: steps_m = steps_ft * MAF(ft)/MAF(m); equal_steps: every method gets steps_ft")
    cache_dir: str = F("data/budget_cache", "where measured MAFs are cached per (backbone, method, batch size)")
    reference_backbone: str = F("", "compute-fair budgets across backbones: a task's budget is the compute of "
                                    "fine-tuning this backbone for steps_ft steps, and every backbone gets the steps "
                                    "that spend it ('' = each backbone's own fine-tuning steps)")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = F(256, "eval batch; inference only, so larger than training")
    subset_fraction: float = F(0.1, "f in n = min(len, max(2C, min_samples, floor(f*len))) for in-stream subsets")
    subset_min: int = F(300, "the 300 in n = min(len, max(2C, 300, floor(f*len))) (docs/BENCHMARK.md §Evaluation)")
    every_n_tasks: int = F(1, "evaluate deployed weights after every n-th task (the last task always)")
    full_at_ends: bool = F(True, "also the full test sets before the first and after the last task (eval_set full; "
                                 "the trajectory is always on the fixed subsets)")
    full_every_n_tasks: int = F(0, "also the full test sets after every n-th task (0: only at the ends)")
    retrieval_k: tuple[int, ...] = F((1, 5), "recall@k reported; R@5 enters A_KA/A_ZS")
    prompts: Literal["primer", "openai_imagenet", "simple_imagenet"] = F("primer", "zero-shot class texts: 'primer' = each dataset's one primer template (the paper's, docs/BENCHMARK.md §Evaluation); 'openai_imagenet' / 'simple_imagenet' = open_clip's 80 / 7 ImageNet template ensembles (a class's embedding is the normalised mean of its templates' normalised embeddings, as open_clip's build_zero_shot_classifier), to compare with open_clip's published zero-shot numbers; the tidy table's prompts column names it")
    cache_mb: int = F(4096, "decoded evaluation images kept in RAM per process (uint8, as the loader gives them): the fixed subsets are decoded at the first evaluation point and reused at every later one (each data-parallel rank keeps only its share), the full test sets too if they fit in what the subsets leave; a set over the budget is decoded at every point; 0 = decode every time (224 px: about 0.15 MB an image)")


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = F("", "MLflow tracking URI; empty = MLFLOW_TRACKING_URI or sqlite at an absolute path under output_dir")
    experiment: str = F("fomo_ray", "MLflow experiment name")
    log_checkpoints: bool = F(True, "log task checkpoints as artifacts (a pointer when they live on shared storage)")
    keep_uploads: bool = F(False, "upload a finished run's final loop state to MLflow as checkpoints/final (else the run's fomo_ray.final_checkpoint tag points at Ray's copy, trimmed as ray.keep_after_run says: one copy, not two)")
    enabled: bool = F(True, "set false to run without MLflow (plain loop runs, unit tests)")
    log_every_n_steps: int = F(10, "training loss, lr, grad norm and samples/s of every step, sent to MLflow in one call every N steps (one SQLite write per step would cost ~4 ms); 0 = off")


@dataclass(frozen=True)
class RayConfig:
    address: str = F("", "Ray cluster address; empty starts a local Ray")
    num_workers: int = F(1, "Ray Train workers per trial (DDP when > 1)")
    min_workers: int = F(0, "elastic lower bound; 0 = fixed num_workers")
    resize_check_s: float = F(60.0, "elastic runs: how often Ray Train looks for room to grow the worker group "
                                    "(growing restarts it from the latest checkpoint)")
    cpus_per_worker: float = F(1.0, "CPUs each Train worker reserves")
    gpus_per_worker: float = F(0.0, "GPUs each worker reserves; fractions pack several small trials per GPU")
    max_concurrent_trials: int = F(0, "0 = as many as resources allow")
    reuse_trial_processes: bool = F(True, "a sweep's next trial runs in the process of one that ended, when it asks "
                                          "for the same resources (Tune's reuse_actors): trials import torch, "
                                          "open_clip, Ray and MLflow once per slot, not each; false starts every "
                                          "trial in a fresh process")
    checkpoint_every_steps: int = F(0, "extra mid-task checkpoints every N steps; 0 = end of task only")
    max_failures: int = F(2, "worker restarts (Train) and trial retries (Tune) before a run is failed; spot "
                             "preemptions are not counted")
    keep_checkpoints: int = F(2, "newest checkpoints Ray keeps per run (>= 1; older task ends are deleted); two, so a "
                                 "crash while one is written still leaves a complete one")
    storage_path: str = F("", "shared storage for checkpoints (required multi-node); empty = output_dir/ray")
    keep_after_run: Literal["deployed", "state", "all"] = F("deployed", "what an ended trial keeps of its checkpoints: "
        "'deployed' = the final one as its open_clip export (model/, sharing the file with MLflow's model/ where both "
        "are local), 'state' = the final loop state whole (to continue the stream), 'all' = every one Ray kept")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = F("default", "experiment name; run names are derived deterministically from it and the config hash")
    seed: int = F(0, "experiment seed; task seeds derive from it and the task index")
    output_dir: str = F("runs", "where results tables, checkpoints, plots and the MLflow db go (relative: see resolved())")
    data: DataConfig = F(DataConfig(), "benchmark data and loaders")
    stream: StreamConfig = F(StreamConfig(), "the task stream")
    backbone: BackboneConfig = F(BackboneConfig(), "the CLIP model")
    method: MethodConfig = F(MethodConfig(), "the continual-update method")
    mixture: MixtureConfig = F(MixtureConfig(), "per-step P/D/B batch mixture and replay buffer")
    optimizer: OptimizerConfig = F(OptimizerConfig(), "AdamW settings")
    schedule: ScheduleConfig = F(ScheduleConfig(), "per-task lr schedule and meta-schedule")
    budget: BudgetConfig = F(BudgetConfig(), "equal-compute budget (MAF)")
    evaluation: EvalConfig = F(EvalConfig(), "zero-shot / retrieval evaluation")
    tracking: TrackingConfig = F(TrackingConfig(), "MLflow")
    ray: RayConfig = F(RayConfig(), "Ray Train / Tune resources and fault tolerance")

    # ------------------------------------------------------------------------------------------- views
    def flat(self) -> dict[str, Any]:
        """``{dotted.key: value}`` for Ray Tune spaces and MLflow params (tuples stay tuples)."""
        return flatten(self)

    def config_hash(self) -> str:
        """Short stable hash of every field; used for deterministic run names and caches."""
        blob = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in self.flat().items()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def resolved(self, base: str | Path | None = None) -> "ExperimentConfig":
        """Same config with every path field made absolute against ``base`` (default: the working directory).

        Call it once in the process that parses the user's input, before handing the config to Ray: Tune changes the
        working directory of each trial, so a relative path would point somewhere else there.
        """
        root = Path(base) if base is not None else Path.cwd()
        changes: dict[str, Any] = {}
        for key in PATH_KEYS:
            value = self.flat()[key]
            if value and not Path(value).expanduser().is_absolute():
                if key == "backbone.pretrained" and not (root / value).exists():
                    continue  # an open_clip tag or 'auto', not a file
                changes[key] = str((root / Path(value).expanduser()).resolve())
            elif value and value.startswith("~"):
                changes[key] = str(Path(value).expanduser())
        return self.replace(changes) if changes else self

    def replace(self, overrides: Mapping[str, Any]) -> "ExperimentConfig":
        """A new config with dotted-key overrides applied (validated like YAML input)."""
        return from_dict(_merge_dotted(to_dict(self), overrides))


PATH_KEYS = ("output_dir", "data.root", "data.pool", "stream.file", "budget.cache_dir", "ray.storage_path",
             "backbone.pretrained")

# --------------------------------------------------------------------------------------------------- (de)serialisation
def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists, as YAML writes them)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def field_docs(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """``{dotted.key: (default, doc)}`` for every leaf field (drives the configuration reference in docs/CONFIG.md)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Any, str]] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(field_docs(t, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f"{prefix}{f.name}"] = (default, f.metadata.get("doc", ""))
    return out


def valid_keys() -> list[str]:
    return list(field_docs().keys())


def _suggest(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union:  # Optional[X]: null (None; also the text None / auto, as str(None) and flags write it) or an X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        unset = value is None or isinstance(value, str) and value.strip().lower() in ("none", "null", "auto")
        return None if unset else _coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _yaml_float(value)  # YAML 1.1 reads '1e-5' (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _yaml_float(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            full = f"{prefix}{k}"
            raise ConfigError(f"unknown config key '{full}'" + _suggest(full, valid_keys() + [prefix + n for n in names]))
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, key + ".")
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested dict (YAML content) into the frozen tree."""
    cfg = _build(ExperimentConfig, data or {}, "")
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is parsed as YAML so numbers/bools/lists get their types."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    return key, yaml.safe_load(raw) if raw.strip() else ""


def _merge_dotted(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))  # deep copy of plain data
    leaves = set(valid_keys())
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for i, p in enumerate(parts[:-1]):
            sub = node.get(p) if isinstance(node, dict) else None
            if not isinstance(sub, dict):
                if key not in leaves:
                    raise ConfigError(f"unknown config key '{key}'" + _suggest(key, sorted(leaves)))
                sub = node.setdefault(p, {})
            node = sub
        if key not in leaves:
            raise ConfigError(f"unknown config key '{key}'" + _suggest(key, sorted(leaves)))
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return out


def read_yaml_mapping(path: str | Path, what: str = "config file", error: type[Exception] = ConfigError) -> dict:
    """A YAML file whose top level is a mapping; ``error`` names the file for missing, invalid or non-mapping input."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{what} {p}: top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> ExperimentConfig:
    """YAML file (optional) + overrides (``["k=v", ...]`` or ``{"k": v}``) -> validated frozen config."""
    data = read_yaml_mapping(path) if path is not None else {}
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(o) for o in overrides)
    return from_dict(_merge_dotted(data, overrides))


# --------------------------------------------------------------------------------------------------- semantic checks
def validate(cfg: ExperimentConfig) -> None:
    """Range checks that a type cannot express; each error names the dotted key."""
    m = cfg.mixture
    total = m.pool + m.update + m.buffer
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"mixture.pool + mixture.update + mixture.buffer must sum to 1, got {total:.4f}")
    for key, v in (("mixture.pool", m.pool), ("mixture.update", m.update), ("mixture.buffer", m.buffer)):
        if v < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {v}")
    checks = [
        ("mixture.batch_size", m.batch_size >= 1, m.batch_size),
        ("stream.num_tasks", cfg.stream.num_tasks >= 1, cfg.stream.num_tasks),
        ("optimizer.lr", cfg.optimizer.lr > 0, cfg.optimizer.lr),
        ("optimizer.weight_decay", cfg.optimizer.weight_decay >= 0, cfg.optimizer.weight_decay),
        ("optimizer.grad_clip", cfg.optimizer.grad_clip >= 0, cfg.optimizer.grad_clip),
        ("optimizer.accum_steps", cfg.optimizer.accum_steps >= 1, cfg.optimizer.accum_steps),
        ("method.merge.weight", 0.0 <= cfg.method.merge.weight <= 1.0, cfg.method.merge.weight),
        ("method.merge.density", 0.0 < cfg.method.merge.density <= 1.0, cfg.method.merge.density),
        ("method.merge.drop_top", 0.0 <= cfg.method.merge.drop_top < 1.0, cfg.method.merge.drop_top),
        ("method.peft.rank", cfg.method.peft.rank >= 1, cfg.method.peft.rank),
        ("method.merge.opcm_alpha", 0.0 < cfg.method.merge.opcm_alpha <= 1.0, cfg.method.merge.opcm_alpha),
        ("method.merge.dop_steps", cfg.method.merge.dop_steps >= 0, cfg.method.merge.dop_steps),
        ("method.merge.dop_lr", cfg.method.merge.dop_lr > 0, cfg.method.merge.dop_lr),
        ("method.merge.dop_energy", 0.0 < cfg.method.merge.dop_energy <= 1.0, cfg.method.merge.dop_energy),
        ("method.merge.dop_ema_beta", 0.0 <= cfg.method.merge.dop_ema_beta <= 1.0, cfg.method.merge.dop_ema_beta),
        ("method.merge.dop_alpha", 0.0 <= cfg.method.merge.dop_alpha <= 1.0, cfg.method.merge.dop_alpha),
        ("method.zscl.weight", cfg.method.zscl.weight >= 0, cfg.method.zscl.weight),
        ("method.zscl.temperature", cfg.method.zscl.temperature > 0, cfg.method.zscl.temperature),
        ("method.zscl.ref_size", cfg.method.zscl.ref_size >= 1, cfg.method.zscl.ref_size),
        ("method.zscl.ref_batch", 1 <= cfg.method.zscl.ref_batch <= cfg.method.zscl.ref_size, cfg.method.zscl.ref_batch),
        ("method.zscl.we_every", cfg.method.zscl.we_every >= 0, cfg.method.zscl.we_every),
        ("method.peft.dropout", 0.0 <= cfg.method.peft.dropout < 1.0, cfg.method.peft.dropout),
        ("schedule.warmup_frac", 0.0 <= cfg.schedule.warmup_frac < 1.0, cfg.schedule.warmup_frac),
        ("budget.total_ft_steps", cfg.budget.total_ft_steps >= 1, cfg.budget.total_ft_steps),
        ("evaluation.subset_fraction", 0.0 < cfg.evaluation.subset_fraction <= 1.0, cfg.evaluation.subset_fraction),
        ("evaluation.every_n_tasks", cfg.evaluation.every_n_tasks >= 1, cfg.evaluation.every_n_tasks),
        ("evaluation.full_every_n_tasks", cfg.evaluation.full_every_n_tasks >= 0, cfg.evaluation.full_every_n_tasks),
        ("data.image_size", cfg.data.image_size >= 8, cfg.data.image_size),
        ("data.scale", 0.0 < cfg.data.scale <= 10.0, cfg.data.scale),
        ("data.num_workers", cfg.data.num_workers >= 0, cfg.data.num_workers),
        ("data.prefetch", cfg.data.prefetch >= 0, cfg.data.prefetch),
        ("ray.num_workers", cfg.ray.num_workers >= 1, cfg.ray.num_workers),
        ("tracking.log_every_n_steps", cfg.tracking.log_every_n_steps >= 0, cfg.tracking.log_every_n_steps),
        ("ray.keep_checkpoints", cfg.ray.keep_checkpoints >= 1, cfg.ray.keep_checkpoints),
        ("mixture.buffer_size", m.buffer_size >= 1, m.buffer_size),
        ("evaluation.cache_mb", cfg.evaluation.cache_mb >= 0, cfg.evaluation.cache_mb),
    ]
    for key, ok, v in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' is out of range: {v!r}")
    merge = cfg.method.merge
    if merge.density + merge.drop_top > 1.0 + 1e-12:  # Breadcrumbs keeps `density` after dropping `drop_top`
        raise ConfigError(f"config keys 'method.merge.density' ({merge.density}) + 'method.merge.drop_top' "
                          f"({merge.drop_top}) must be <= 1")
    _check_workers(cfg)


def _check_workers(cfg: ExperimentConfig) -> None:
    """Refused before any worker starts: an elastic lower bound above the upper one, or more data-parallel workers
    (times accumulation micro-batches) than samples in the global batch (every rank, and micro-batch, needs one)."""
    r, b = cfg.ray, cfg.mixture.batch_size
    if r.min_workers < 0 or r.min_workers > r.num_workers:
        raise ConfigError(f"config key 'ray.min_workers' = {r.min_workers} must lie in [0, 'ray.num_workers' = "
                          f"{r.num_workers}] (0 = a fixed worker count)")
    if r.resize_check_s < 0:
        raise ConfigError(f"config key 'ray.resize_check_s' = {r.resize_check_s} must be >= 0")
    if r.num_workers > b:
        raise ConfigError(f"config key 'ray.num_workers' = {r.num_workers} is larger than 'mixture.batch_size' = {b}: "
                          f"each data-parallel worker needs at least one sample of the global batch")
    k = cfg.optimizer.accum_steps
    if r.num_workers * k > b:  # shards of floor(b / W) rows or more, each cut into k micro-batches
        raise ConfigError(f"config key 'optimizer.accum_steps' = {k} times 'ray.num_workers' = {r.num_workers} is "
                          f"larger than 'mixture.batch_size' = {b}: every micro-batch of every worker needs a sample")


# --------------------------------------------------------------------------------------------------- docs
def reference_markdown() -> str:
    """The configuration reference of docs/CONFIG.md, generated from the fields (tests/test_repo.py checks it)."""
    rows = ["| key | default | why |", "| --- | --- | --- |"]
    for key, (default, doc) in field_docs().items():
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        rows.append(f"| `{key}` | `{shown}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m fomo_ray.config  -> prints the reference table
    print(reference_markdown())
