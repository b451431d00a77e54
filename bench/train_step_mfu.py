"""Training-step throughput and model FLOP utilisation (MFU) of the project's own training step on one device.

For each config (``finetune``, ``lora`` r=4, ``bitfit``: set up by ``fomo_ray.methods.build_method``) it times the
step that ``fomo_ray.core.loop.run_stream`` runs - bf16 autocast forward of both towers,
``fomo_ray.maths.losses.clip_loss``, backward, one global grad-norm clip, the loop's AdamW
(``fomo_ray.maths.optim.make_optimizer``), logit-scale clamp - on a fixed random batch, and reports:

- samples/s over ``--steps`` timed steps after ``--warmup`` untimed ones, CUDA-synchronised;
- achieved TFLOP/s = FLOPs per step x steps / seconds, FLOPs per step from the budget module
  (``fomo_ray.budgets.budget.method_record``: ``FlopCounterMode`` over one real step + AdamW's elementwise work,
  docs/BENCHMARK.md §Budgets);
- MFU = achieved / the card's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, by device name; unknown card -> null);
- peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (and the budget module's own figure).

``merge`` times the EMA-merge step ``merge_ops.merge("interpolate", m_prev, [theta_t], [0.5])`` of two random
state dicts of the same architecture on the device. It is elementwise and memory-bound, so it reports bandwidth
(bytes read + written per second, against the card's HBM peak) instead of an MFU, which would be ~0 by design.

For ``finetune`` a FLOP-count cross-check counts the same step on the CPU at batch 2: per-sample FLOPs must agree
(a GPU count far below the CPU one means FlopCounterMode missed a CUDA kernel, e.g. an attention backend, and the
MFU would be understated).

Profiles: on CUDA ViT-B-16 (random init), batch 256, 224 px, 10 timed + 3 warm-up steps; without CUDA (the dry run of
``bench/gpu_check.sh``) fomo-tiny-s, batch 8, 32 px, 2 + 1 steps. Usage::

    python bench/train_step_mfu.py [--configs finetune lora bitfit merge] [--out mfu.json] [--device cuda]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = ("finetune", "lora", "bitfit", "merge")
#: dense bf16 tensor-core peak (no sparsity) in TFLOP/s, from NVIDIA's data sheets
PEAK_BF16_TFLOPS: dict[str, float] = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0}
#: HBM peak bandwidth in TB/s (same data sheets), for the memory-bound merge step
HBM_PEAK_TBPS: dict[str, float] = {"H100 SXM": 3.35, "H100 PCIe": 2.0, "H200": 4.8}
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {"arch": "ViT-B-16", "batch_size": 256, "steps": 10, "warmup": 3},
    "cpu-dry-run": {"arch": "fomo-tiny-s", "batch_size": 8, "steps": 2, "warmup": 1},
}
FLOP_CHECK_BATCH = 2
FLOP_CHECK_TOLERANCE = 0.02


# --------------------------------------------------------------------------------------------------- pure functions
def card_family(device_name: str) -> str | None:
    """``"H100 SXM"`` / ``"H100 PCIe"`` / ``"H200"`` from a CUDA device name, ``None`` for any other card.

    The SXM H100 reports itself as "NVIDIA H100 80GB HBM3"; the NVL variant ("H100 NVL") has other peaks, so it
    stays unknown rather than borrowing a wrong one."""
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name:
        if "PCIE" in name:
            return "H100 PCIe"
        if "SXM" in name or "HBM3" in name:
            return "H100 SXM"
    return None


def peak_bf16_tflops(device_name: str) -> float | None:
    return PEAK_BF16_TFLOPS.get(card_family(device_name) or "")


def hbm_peak_tbps(device_name: str) -> float | None:
    return HBM_PEAK_TBPS.get(card_family(device_name) or "")


def achieved_tflops(gflops_per_step: float, steps: int, seconds: float) -> float:
    return gflops_per_step * steps / seconds / 1e3


def mfu(tflops: float, peak: float | None) -> float | None:
    return None if peak is None else tflops / peak


# --------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> tuple[float, list[Any]]:
    """Seconds for ``steps`` calls of ``fn`` after ``warmup`` untimed ones (synchronised before and after), and
    the timed calls' results. Peak-memory counters are reset after the warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = [fn() for _ in range(steps)]
    sync(device)
    return time.perf_counter() - start, out


def cuda_peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------------- configs
def make_cfg(arch: str, method: str, cache_dir: str):
    from fomo_ray.config import load_config

    # bf16 autocast on every device: the dry run exercises the same code path as the GPU
    return load_config(None, {"backbone.name": arch, "backbone.pretrained": "", "backbone.precision": "bf16",
                              "method.name": method, "method.peft.rank": 4, "budget.cache_dir": cache_dir})


def synthetic_batch(backbone, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random images and distinct captions through the backbone's tokenizer (padded to its context, as in
    the loop, so the text tower does the same work as on real captions)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, backbone.image_size, backbone.image_size, generator=g)
    tokens = backbone.tokenizer([f"a photo of object number {i}, a kind of shape" for i in range(batch_size)])
    return images.to(device), tokens.to(device)


def train_step_fn(backbone, model, cfg, images, tokens) -> Callable[[], torch.Tensor]:
    """One step exactly as ``fomo_ray.core.loop.run_stream`` takes it (minus data loading and method hooks that are
    no-ops for these methods); returns the detached loss without synchronising."""
    from fomo_ray.maths.optim import make_optimizer
    from fomo_ray.maths.losses import clamp_logit_scale_, clip_loss
    from fomo_ray.maths.optim import trainable_named

    opt = make_optimizer(model, cfg)
    params = [p for _, p in trainable_named(model)]
    device = images.device

    def step() -> torch.Tensor:
        with backbone.autocast(device):
            img = model.encode_image(images, normalize=True)
            txt = model.encode_text(tokens, normalize=True)
            loss = clip_loss(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
        opt.step()
        clamp_logit_scale_(model)
        return loss.detach()

    return step


def flop_check(cfg, spec, device_counted_gflops: float, batch_size: int) -> dict[str, Any]:
    """Per-sample counted GFLOPs of the same step on the CPU at batch 2 vs on the device at ``batch_size``
    (``spec``: the ``budget.BackboneSpec`` the device count used)."""
    from fomo_ray.budgets import budget

    cost = budget.registry_cost(cfg, cfg.method.name)
    rec = budget.measure_method(cfg.method.name, cost, spec.factory, backbone=spec.name, batch_size=FLOP_CHECK_BATCH,
                                image_size=spec.image_size, context_length=spec.context_length, device="cpu")
    device_per_sample = device_counted_gflops / batch_size
    cpu_per_sample = rec.counted_gflops / FLOP_CHECK_BATCH
    ratio = device_per_sample / cpu_per_sample
    return {"device_gflops_per_sample": device_per_sample, "cpu_gflops_per_sample_b2": cpu_per_sample,
            "ratio": ratio, "ok": abs(ratio - 1.0) <= FLOP_CHECK_TOLERANCE}


def measure_train(name: str, arch: str, batch_size: int, steps: int, warmup: int, device: torch.device,
                  cache_dir: str) -> dict[str, Any]:
    from fomo_ray.budgets import budget
    from fomo_ray.models.backbones import create_backbone
    from fomo_ray.methods import build_method

    cfg = make_cfg(arch, name, cache_dir)
    torch.manual_seed(0)
    # built on the CPU and moved after the budget's measurement, so its weights are not in that step's CUDA peak
    bb = create_backbone(arch, "", device="cpu", precision=cfg.backbone.precision)
    spec = budget.BackboneSpec(arch, lambda: create_backbone(arch, "").model, bb.image_size, bb.context_length)
    t0 = time.perf_counter()
    record = budget.method_record(cfg, name, backbone=spec, device=device, batch_size=batch_size)
    count_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build_method(cfg).setup(bb.model.to(device))
    model.train()
    images, tokens = synthetic_batch(bb, batch_size, device)
    seconds, losses = timed(train_step_fn(bb, model, cfg, images, tokens), device, steps, warmup)
    losses = [float(x) for x in losses]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{name}: non-finite training loss {losses}")
    tflops = achieved_tflops(record.step_gflops, steps, seconds)
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out = {"config": name, "arch": arch, "batch_size": batch_size, "image_size": bb.image_size,
           "precision": bb.precision, "steps": steps, "warmup": warmup, "seconds": seconds,
           "step_ms": 1e3 * seconds / steps, "samples_per_s": batch_size * steps / seconds,
           "gflops_per_step": record.step_gflops, "counted_gflops_per_step": record.counted_gflops,
           "trainable_params": record.trainable_params, "total_params": record.total_params,
           "achieved_tflops": tflops, "peak_bf16_tflops": peak, "mfu": mfu(tflops, peak),
           "cuda_peak_mem_gib": cuda_peak_gib(device), "budget_peak_mem_gib": record.peak_bytes / 2**30,
           "budget_memory_kind": record.memory_kind, "flop_count_s": count_s, "losses": losses}
    del model, bb
    if name == "finetune":
        out["flop_check"] = flop_check(cfg, spec, record.counted_gflops, batch_size)
    return out


def measure_merge(arch: str, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """The EMA-merge step (interpolate, w = 0.5) of two random state dicts of ``arch`` on ``device``."""
    from fomo_ray.maths import merge_ops
    from fomo_ray.models.backbones import create_backbone

    torch.manual_seed(0)
    a = create_backbone(arch, "", device=device).model.state_dict()
    torch.manual_seed(1)
    b = create_backbone(arch, "", device=device).model.state_dict()
    merged_bytes = sum(v.numel() * v.element_size() for v in a.values() if v.is_floating_point())
    numel = sum(v.numel() for v in a.values() if v.is_floating_point())
    seconds, _ = timed(lambda: merge_ops.merge("interpolate", a, [b], [0.5]), device, steps, warmup)
    per_merge = seconds / steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gbps = 3 * merged_bytes / per_merge / 1e9  # read a, read b, write the merged tensors
    hbm = hbm_peak_tbps(name)
    return {"config": "merge", "arch": arch, "operator": "interpolate", "weight": 0.5, "steps": steps,
            "warmup": warmup, "seconds": seconds, "merge_ms": 1e3 * per_merge, "merges_per_s": 1 / per_merge,
            "merged_params": numel, "achieved_gbps": gbps, "hbm_peak_tbps": hbm,
            "bandwidth_util": None if hbm is None else gbps / (hbm * 1e3),
            "achieved_tflops": achieved_tflops(3 * numel / 1e9, steps, seconds),  # lerp: sub, mul, add
            "mfu": None, "mfu_note": "memory-bound elementwise op: judged by bandwidth_util, not MFU",
            "cuda_peak_mem_gib": cuda_peak_gib(device)}


# --------------------------------------------------------------------------------------------------- report
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Training step on {report['device_name']} ({report['profile']}): "
             f"{report['arch']}, batch {report['batch_size']}, bf16 autocast, {report['steps']} timed steps after "
             f"{report['warmup']} warm-up.", "",
             "| config | samples/s | step ms | GFLOP/step | TFLOP/s | MFU | CUDA peak GiB | trainable M |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        if r["config"] == "merge":
            continue
        lines.append(f"| {r['config']} | {_fmt(r['samples_per_s'], 4)} | {_fmt(r['step_ms'], 4)} | "
                     f"{_fmt(r['gflops_per_step'], 5)} | {_fmt(r['achieved_tflops'])} | "
                     f"{_pct(r['mfu'])} | "
                     f"{_fmt(r['cuda_peak_mem_gib'])} | {r['trainable_params'] / 1e6:.3f} |")
    for r in report["results"]:
        if r["config"] == "merge":
            util = _pct(r["bandwidth_util"])
            lines += ["", f"Merge step (interpolate w=0.5, {r['merged_params'] / 1e6:.1f} M params): "
                          f"{_fmt(r['merge_ms'], 4)} ms, {_fmt(r['achieved_gbps'], 4)} GB/s ({util} of HBM peak)."]
        if "flop_check" in r:
            c = r["flop_check"]
            lines += ["", f"FLOP-count check ({r['config']}): {_fmt(c['device_gflops_per_sample'], 5)} GFLOP/sample "
                          f"on the device vs {_fmt(c['cpu_gflops_per_sample_b2'], 5)} on the CPU (ratio "
                          f"{c['ratio']:.4f}, {'ok' if c['ok'] else 'MISMATCH'})."]
    for name, err in report["errors"].items():
        lines += ["", f"**{name} failed:** {err}"]
    return "\n".join(lines)


def write_json_atomic(path: Path, obj: Any) -> None:
    from fomo_ray.atomic import write_json  # after sys.path has the repo

    write_json(path, obj, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (the dry-run profile)")
    p.add_argument("--arch", default=None, help="default: ViT-B-16 on CUDA, fomo-tiny-s on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 8 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--out", default=None, help="JSON report, rewritten after every config")
    p.add_argument("--cache-dir", default=None, help="budget cache (default: a fresh temp dir: always measure)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mfu-budget-") as tmp:  # a fresh budget cache: always measure
        return run(args, args.cache_dir or tmp)


def run(args: argparse.Namespace, cache_dir: str) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profile = "gpu" if device.type == "cuda" else "cpu-dry-run"
    settings = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in PROFILES[profile].items()}
    report: dict[str, Any] = {
        "profile": profile, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, **settings, "results": [], "errors": {}}
    for name in args.configs:
        t0 = time.perf_counter()
        try:
            if name == "merge":
                result = measure_merge(settings["arch"], settings["steps"], settings["warmup"], device)
            else:
                result = measure_train(name, settings["arch"], settings["batch_size"], settings["steps"],
                                       settings["warmup"], device, cache_dir)
            result["wall_s"] = time.perf_counter() - t0
            report["results"].append(result)
        except Exception as e:  # noqa: BLE001 - one config's failure (e.g. OOM) is recorded, the others still run
            report["errors"][name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["markdown"] = markdown(report)
        if args.out:
            write_json_atomic(Path(args.out), report)
    print(report["markdown"])
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
