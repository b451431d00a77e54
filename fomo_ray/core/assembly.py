"""Run assembly: everything a continual run needs besides the loop's own variables, built once and deterministic.

:func:`build_run` opens the benchmark, creates the backbone with theta_0, builds and sets up the method, asks the
budget for the steps per task, and makes the evaluator and the replay buffer. It never *prepares* inputs: a missing
or stale FiF-mini build or tiny base checkpoint raises :class:`~fomo_ray.core.inputs.InputsMissing` naming the command
that makes it (``fomo-ray run`` and sweeps call ``prep.ensure_inputs`` first, so users rarely see it), and so does
data stored at another size than the backbone takes (:class:`ImageSizeMismatch`, unless ``data.allow_resize``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fomo_ray.core import distributed
from fomo_ray.config import ConfigError, ExperimentConfig
from fomo_ray.core.inputs import FIFMINI_NAME, InputsMissing, PreparedByRun, auto_base_path, fifmini_generator_info
from fomo_ray.maths.memory_saving import check_accumulation, enable_grad_checkpointing
from fomo_ray.methods import Method, build_method
from fomo_ray.methods.base import TaskPlan
from fomo_ray.seeding import derive_seed, seed_everything


@dataclass
class Run:
    """What one run needs besides the loop's own variables (built once by :func:`build_run`)."""

    cfg: ExperimentConfig
    name: str
    device: torch.device
    bench: Any
    backbone: Any
    model: nn.Module
    method: Method
    plan: list[TaskPlan]
    pool_bench: Any  # where P lives: the benchmark itself or the directory of ``data.pool``
    pool_rows: np.ndarray
    evaluator: Any
    buffer: Any
    token_key: str  # which stored token ids the training batches read (fomo_ray/data/tokens.py)

    def new_scaler(self) -> torch.amp.GradScaler:
        """fp16 autocast needs loss scaling against gradient underflow; for bf16/fp32 it is a pass-through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.backbone.precision == "fp16")


def run_name(cfg: ExperimentConfig) -> str:
    """Deterministic run name: the experiment name plus the config hash (never a timestamp)."""
    return f"{cfg.name}-{cfg.config_hash()}"


def default_device() -> torch.device:
    """CUDA when this process can use it, else the CPU. A run that *asked* for a GPU (``ray.gpus_per_worker`` > 0)
    never gets here silently: :func:`check_gpu` refuses it first (the Ray edge calls it before any step)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DeviceUnavailable(ValueError):
    """A run asked for a GPU that this process cannot use (CUDA unavailable); the message names the torch build, its
    CUDA version and the NVIDIA driver's. Deterministic: the same image fails every retry the same way."""


NVIDIA_PROC_VERSION = "/proc/driver/nvidia/version"  # the kernel module's version, readable without CUDA


def nvidia_driver(run: Any = None, proc_version: str = NVIDIA_PROC_VERSION) -> str:
    """The NVIDIA driver of this machine in words, read without CUDA: ``nvidia-smi``'s driver version and the highest
    CUDA version it supports, else the kernel module's version from /proc, else "no NVIDIA driver found"."""
    import re
    import subprocess

    run = run or subprocess.run
    try:
        out = run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout or ""
    except (OSError, subprocess.SubprocessError):
        out = ""
    driver, cuda = re.search(r"Driver Version:\s*([\d.]+)", out), re.search(r"CUDA Version:\s*([\d.]+)", out)
    if driver:
        return (f"NVIDIA driver {driver.group(1)}" + (f" (supports CUDA up to {cuda.group(1)})" if cuda else "")
                + " per nvidia-smi")
    try:
        text = Path(proc_version).read_text()
    except OSError:
        return "no NVIDIA driver found (no nvidia-smi, no " + proc_version + ")"
    found = re.search(r"Kernel Module(?: for \S+)?\s+([\d.]+)", text)
    return f"NVIDIA kernel module {found.group(1) if found else text.strip().splitlines()[0]} per {proc_version}"


LOGICAL_GPUS = "FOMO_RAY_LOGICAL_GPUS"  # set to 1 where Ray's GPUs are logical ones on purpose (packing tests)


def gpu_problem(gpus: float, driver: Any = nvidia_driver) -> str:
    """Why a process that reserved ``gpus`` GPUs (``ray.gpus_per_worker``) cannot train on one; "" when it can (or
    asked for none). Names the torch build, its CUDA version and the driver's, and the ways out."""
    import os

    # LOGICAL_GPUS=1: Ray's logical GPUs on a machine without CUDA (tests of trial packing; nothing trains on them)
    if gpus <= 0 or torch.cuda.is_available() or os.environ.get(LOGICAL_GPUS) == "1":
        return ""

    built = torch.version.cuda
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"ray.gpus_per_worker = {gpus:g} asks for a GPU, but CUDA is not available in this process: torch "
            f"{torch.__version__} is " + (f"built for CUDA {built}" if built else "a CPU-only build")
            + f"; {driver()}"
            + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
            + ". The run would train on the CPU while Ray holds the GPU, so it is refused before any step: install "
            "the torch CUDA variant that this driver supports (scripts/setup.sh picks it from nvidia-smi; a CUDA 13 "
            "build needs driver >= 580), use an image with a newer driver (cluster/*.yaml), or set "
            "ray.gpus_per_worker=0 to train on CPUs")


def check_gpu(gpus: float) -> None:
    """Raise :class:`DeviceUnavailable` when ``gpus`` > 0 GPUs were asked for and CUDA is unavailable here."""
    problem = gpu_problem(gpus)
    if problem:
        raise DeviceUnavailable(problem)


def _prepare_hint(cfg: ExperimentConfig) -> str:
    d = cfg.data
    return (f"`fomo-ray prepare fifmini --root {d.root} --seed {d.generator_seed} --image-size {d.image_size} "
            f"--scale {d.scale}` builds it (`fomo-ray run` and sweeps do so automatically)")


def open_data(cfg: ExperimentConfig) -> Any:
    """The benchmark of ``cfg.data``, opened (never built). With ``data.prepare_if_missing`` a FiF-mini root must hold
    the build the config asks for (generator seed, image size, scale), else the run would silently use other data."""
    from fomo_ray.data.format import MANIFEST, open_benchmark

    root = Path(cfg.data.root)
    if cfg.data.benchmark == "fifmini" and cfg.data.prepare_if_missing:
        if not (root / MANIFEST).is_file():
            raise PreparedByRun(f"no FiF-mini benchmark at {root} (config key 'data.root'); {_prepare_hint(cfg)}")
        bench = open_benchmark(root)
        want = fifmini_generator_info(cfg.data.generator_seed, cfg.data.image_size, cfg.data.scale)
        if bench.manifest.get("generator") != want:
            raise InputsMissing(f"FiF-mini at {root} was generated with {bench.manifest.get('generator')}, but the "
                                f"config asks for {want}; {_prepare_hint(cfg)}")
        return bench
    return open_benchmark(root)


class ImageSizeMismatch(InputsMissing):
    """The backbone's input size differs from the stored image size of the benchmark or pool it would read (and
    ``data.allow_resize`` is off); the message names both sizes and the command that stores the data at the right
    size."""


def backbone_input_size(name: str) -> tuple[int, int] | None:
    """(height, width) of the images architecture ``name`` takes, read from open_clip's model config
    (``vision_cfg.image_size``, what ``create_backbone`` gives as ``Backbone.image_size``) without building the model;
    None for an architecture open_clip does not know (``create_backbone`` / ``tokenizer_for`` name it)."""
    import open_clip

    from fomo_ray.models.backbones import register_tiny_archs

    register_tiny_archs()
    size = ((open_clip.get_model_config(name) or {}).get("vision_cfg") or {}).get("image_size")
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), int(w)


def check_image_size(cfg: ExperimentConfig, bench: Any, pool: Any | None = None) -> None:
    """Refuse a backbone whose input size differs from the stored image size of ``bench`` (``data.root``) or of the
    pool (``pool``, else ``data.pool`` opened here): the loaders would resize every image to the model's size, e.g.
    upsample FiF-mini's 32 px to a 224 px ViT, and the numbers would not be the ones the model gets at its own
    resolution. ``data.allow_resize`` accepts it. Raises :class:`ImageSizeMismatch` naming both sizes, the backbone,
    the directory and the ``fomo-ray prepare`` command that stores the data at the backbone's size."""
    if cfg.data.allow_resize:
        return
    want = backbone_input_size(cfg.backbone.name)
    if want is None:
        return
    stores = [("data.root", "benchmark", bench)]
    if cfg.data.pool:
        from fomo_ray.data.format import open_benchmark

        stores.append(("data.pool", "pool", pool if pool is not None else open_benchmark(cfg.data.pool)))
    for key, what, store in stores:
        have = int(store.image_size)
        if want == (have, have):
            continue
        shown = f"{want[0]}" if want[0] == want[1] else f"{want[0]}x{want[1]}"
        raise ImageSizeMismatch(
            f"backbone '{cfg.backbone.name}' takes {shown} px images but the {what} at {store.root} (config key "
            f"'{key}') stores {have} px images; {_store_at(cfg, store, key, max(want))}, or set "
            f"data.allow_resize=true to resize every image from {have} to {shown} px on the fly")


def _store_at(cfg: ExperimentConfig, store: Any, key: str, size: int) -> str:
    """How to get the data of ``store`` (read through config key ``key``) stored at ``size`` px: the ``fomo-ray
    prepare`` command that writes it (beside the old directory, which other runs may read) and the key to set."""
    root = Path(store.root)
    new = root.with_name(f"{root.name}_{size}px")
    gen = store.manifest.get("generator") or {}
    if gen.get("name") == FIFMINI_NAME:
        command = (f"`fomo-ray prepare fifmini --root {new} --seed {gen.get('seed', cfg.data.generator_seed)} "
                   f"--image-size {size} --scale {gen.get('scale', cfg.data.scale)}`")
        if key == "data.root" and cfg.data.benchmark == FIFMINI_NAME and cfg.data.prepare_if_missing:
            return (f"set data.image_size={size} data.root={new} to use FiF-mini at {size} px (`fomo-ray run` and "
                    f"sweeps build it; by hand: {command})")
        return f"store FiF-mini at {size} px with {command} and set {key}={new}"
    if any(d.role in ("adapt", "eval") for d in store.datasets.values()):
        return (f"convert FiF at {size} px with `fomo-ray prepare fif --root <FiF data root> --out {new} "
                f"--image-size {size}` (with your other options; a --pool converted at {size} px too) and set "
                f"{key}={new}")
    return (f"convert the pool at {size} px with `fomo-ray prepare pool --shards <webdataset shards> --out {new} "
            f"--image-size {size}` and set {key}={new}")


def resolve_pretrained(cfg: ExperimentConfig, bench: Any) -> str:
    """``backbone.pretrained``; ``auto`` means the cached CPU-pretrained base of a tiny architecture (never trained
    here: a missing one raises InputsMissing naming ``fomo-ray pretrain``)."""
    p = cfg.backbone.pretrained
    if p != "auto":
        return p
    arch = cfg.backbone.name
    path = auto_base_path(arch, bench)
    if not path.is_file():
        raise PreparedByRun(f"no pretrained {arch} base for {bench.root} at {path} (backbone.pretrained=auto); "
                            f"`fomo-ray pretrain --arch {arch} data.root={bench.root}` trains it "
                            f"(`fomo-ray run` and sweeps do so automatically)")
    return str(path)


def stream_task_rows(cfg: ExperimentConfig, bench: Any) -> list[np.ndarray]:
    """Train-split row ids of every task's update data D_t (docs/BENCHMARK.md §Streams and tasks)."""
    from fomo_ray.data.stream import load_stream, resolve_stream, split_tasks, task_rows

    entries = load_stream(resolve_stream(bench, cfg.stream.file, cfg.stream.ordering), bench)
    # dataset-incremental orderings are cut only at dataset boundaries (docs/BENCHMARK.md §Streams and tasks)
    by_dataset = "dataset_incremental" in cfg.stream.ordering and not cfg.stream.file
    return [task_rows(bench, task, "train") for task in split_tasks(entries, cfg.stream.num_tasks, by_dataset)]


def planned_tasks(cfg: ExperimentConfig) -> int:
    """How many tasks the run's method trains (the stream's T; joint training: 1), i.e. its final point."""
    return len(build_method(cfg).task_plan([np.zeros(0, dtype=np.int64)] * cfg.stream.num_tasks, 1))


def stream_step(cfg: ExperimentConfig, point: int) -> int:
    """Where evaluation point ``point`` stands on the stream's axis (0..T), the step of its MLflow metrics: the point
    itself, except for a method that trains the whole stream in fewer tasks (``joint``: one task over all T tasks'
    data), whose points are spread over the stream (joint's point 1 stands at T), so its charts line up."""
    planned = planned_tasks(cfg)
    return point * cfg.stream.num_tasks // planned if planned else point


def eval_plan(num_tasks: int, cfg: ExperimentConfig) -> dict[int, bool]:
    """``{evaluation point: full test sets too?}``. Every point (0, every n-th task, the last) is evaluated on the same
    fixed subsets, so a trajectory is one evaluation set; the full test sets are evaluated as well at 0 and the last
    point (``full_at_ends``) and every ``full_every_n_tasks`` tasks, and reported as ``eval_set == "full"``."""
    e = cfg.evaluation
    points = sorted({0, num_tasks, *(p for p in range(1, num_tasks) if p % e.every_n_tasks == 0)})
    k = e.full_every_n_tasks
    return {p: (e.full_at_ends and p in (0, num_tasks)) or (k > 0 and p % k == 0) for p in points}


def build_run(cfg: ExperimentConfig, device: torch.device | str | None = None) -> Run:
    """Data, backbone (theta_0), method (set up), task plan, evaluator and buffer of a run; deterministic."""
    from fomo_ray.models.backbones import create_backbone
    from fomo_ray.budgets.budget import steps_per_task
    from fomo_ray.data.buffer import make_buffer
    from fomo_ray.models.evaluation import Evaluator

    device = torch.device(device) if device is not None else default_device()
    with distributed.rank_zero_first():  # the budget cache is measured once, not W times
        inputs = read_inputs(cfg)
        bench, pool_bench, tasks, pretrained = inputs.bench, inputs.pool, inputs.tasks, inputs.pretrained
        method = build_method(cfg)
        # the budget may build and measure models (drawing random numbers) or read its cache: do it before seeding
        steps = steps_per_task(cfg, method.cost_as or method.name, len(tasks), device=device)
    steps = distributed.from_rank_zero(steps)  # ranks must agree on the step count or the all-reduces deadlock
    seed_everything(derive_seed(cfg.seed, "setup"))  # random init ('' pretrained) and adapter init draw here
    backbone = create_backbone(cfg.backbone.name, pretrained, device=device, precision=cfg.backbone.precision,
                               quick_gelu=cfg.backbone.quick_gelu)
    if cfg.backbone.grad_checkpointing:  # a flag on open_clip's transformers: adapters injected below are inside
        enable_grad_checkpointing(backbone.model)
    model = method.setup(backbone.model)
    check_accumulation(model, cfg.optimizer.accum_steps)
    plan = method.task_plan(tasks, steps)
    evaluator = Evaluator(bench, cfg.evaluation, cfg.seed, backbone.image_size, backbone.mean, backbone.std,
                          backend=cfg.data.loader, num_workers=cfg.data.num_workers,
                          precision=cfg.backbone.precision, ranks=distributed.world(),
                          gather=lambda rows: distributed.gather_rows(rows, device))  # each rank evaluates a share
    buffer = make_buffer(cfg.mixture.buffer_policy, cfg.mixture.buffer_size, derive_seed(cfg.seed, "buffer"))
    pool_rows = np.arange(pool_bench.num_rows("pool"), dtype=np.int64)
    token_key = stored_tokens(cfg, backbone, bench, pool_bench)  # the built tokenizer's key (read_inputs checked it)
    if method.reference_size:  # a method that distils on pool data (ZSCL) gets its fixed reference set once
        method.use_reference(*reference_set(cfg, bench, pool_bench, backbone, token_key, device,
                                            method.reference_size))
    return Run(cfg, run_name(cfg), device, bench, backbone, model, method, plan, pool_bench, pool_rows, evaluator,
               buffer, token_key)


def reference_set(cfg: ExperimentConfig, bench: Any, pool_bench: Any, backbone: Any, token_key: str,
                  device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pool samples drawn once from ``derive_seed(cfg.seed, "reference")`` as one mixture batch of pool data
    only: model-ready images on ``device`` and their caption token ids. The same on every rank and every resume."""
    from fomo_ray.data.augment import model_input
    from fomo_ray.data.mixture import MixedBatches

    pool_rows = np.arange(pool_bench.num_rows("pool"), dtype=np.int64)
    mixed = MixedBatches(bench, pool_rows, np.zeros(0, np.int64), None, (n, 0, 0), derive_seed(cfg.seed, "reference"),
                         0, token_key=token_key, backend=cfg.data.loader, image_size=backbone.image_size,
                         num_workers=cfg.data.num_workers, pool_bench=pool_bench)
    batch = mixed.batch(0)
    images = model_input(batch["images"].to(device), backbone.image_size, backbone.mean, backbone.std)
    return images, batch["tokens"].to(device)


def check_named_files(cfg: ExperimentConfig) -> None:
    """The files a config names exist (``stream.file``; a checkpoint path in ``backbone.pretrained``): checked before
    anything is prepared, so a typo is refused at once rather than after FiF-mini or a base was built for it."""
    from fomo_ray.models.backbones import BackboneError, is_checkpoint_path

    if cfg.stream.file and not Path(cfg.stream.file).is_file():
        raise ConfigError(f"config key 'stream.file': no such file: {cfg.stream.file}")
    p = cfg.backbone.pretrained
    if p and p != "auto" and is_checkpoint_path(p) and not Path(p).is_file():
        raise BackboneError(f"checkpoint file not found: {p} (config key 'backbone.pretrained')")


@dataclass(frozen=True)
class Inputs:
    """What a run reads from disk, read and checked by :func:`read_inputs`."""

    bench: Any              # the benchmark (data.root)
    pool: Any               # the pool's benchmark (data.pool, else the benchmark itself)
    tasks: list[np.ndarray]  # the stream cut into T tasks: each task's training rows
    pretrained: str         # the resolved backbone.pretrained (a tag, a checkpoint path, or "")
    token_key: str          # the token ids of the model's tokenizer, stored in both benchmarks


def read_inputs(cfg: ExperimentConfig) -> Inputs:
    """Read and check what a run reads: the benchmark and pool, the stream (read, validated and cut into T tasks),
    the model's input size against the stored image size (:func:`check_image_size`), the token ids of the model's
    tokenizer and the base checkpoint's path. The one reader of a run's inputs: :func:`build_run` and the sweep
    driver's pre-launch check (:func:`check_inputs`) both call it, so they refuse the same inputs with the same line
    (``InputsMissing``, ``DataError``, ``BackboneError``, ...)."""
    from fomo_ray.models.backbones import tokenizer_for
    from fomo_ray.data.format import open_benchmark
    from fomo_ray.data.tokens import tokenizer_key

    bench = open_data(cfg)
    pool = open_benchmark(cfg.data.pool) if cfg.data.pool else bench
    tasks = stream_task_rows(cfg, bench)
    tokenizer, context_length = tokenizer_for(cfg.backbone.name)  # (an unknown architecture is named here)
    check_image_size(cfg, bench, pool)  # before anything is built or measured
    key = tokenizer_key(tokenizer, context_length)
    _check_tokens(cfg, key, bench, pool)
    return Inputs(bench, pool, tasks, resolve_pretrained(cfg, bench), key)


def check_inputs(cfg: ExperimentConfig) -> None:
    """Everything :func:`build_run` reads, checked without building the run, so that a sweep refuses a bad trial
    before any trial starts: :func:`read_inputs`, and a base checkpoint file read and matched against the
    architecture on the CPU (a tag's activation against ``backbone.quick_gelu``)."""
    from fomo_ray.models.backbones import create_backbone, is_checkpoint_path, resolve_quick_gelu

    pretrained = read_inputs(cfg).pretrained
    if pretrained and is_checkpoint_path(pretrained):  # a tag is fetched (and checked) by open_clip in the trial
        create_backbone(cfg.backbone.name, pretrained, device="cpu", quick_gelu=cfg.backbone.quick_gelu)
    else:  # a tag: its activation against backbone.quick_gelu, from open_clip's registry (no download)
        resolve_quick_gelu(cfg.backbone.name, pretrained, cfg.backbone.quick_gelu)


def stored_tokens(cfg: ExperimentConfig, backbone: Any, *benches: Any) -> str:
    """The token-id key of the backbone's tokenizer, checked to be stored in every benchmark the run reads (the
    training step runs no tokenizer); a missing one raises InputsMissing naming the upgrade command."""
    from fomo_ray.data.tokens import tokenizer_key

    key = tokenizer_key(backbone.tokenizer, backbone.context_length)
    _check_tokens(cfg, key, *benches)
    return key


def _check_tokens(cfg: ExperimentConfig, key: str, *benches: Any) -> None:
    from fomo_ray.data.tokens import has_tokens, upgrade_command

    for b in benches:
        if not has_tokens(b, key):
            raise PreparedByRun(f"benchmark {b.root} has no token ids for the tokenizer of {cfg.backbone.name} "
                                f"('{key}'; older fomo_ray versions did not write them); add them with: "
                                f"{upgrade_command(b.root, cfg.backbone.name)}")
